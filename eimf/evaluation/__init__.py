"""Full-ranking evaluation: metrics, faiss retrieval merged over interests, and the evaluate entry points."""
from eimf.evaluation.metrics import (
    MetricAccumulator,
    hit_matrix,
    hitrate_at_n,
    ndcg_at_n,
    recall_at_n,
    user_metrics,
)
from eimf.evaluation.retrieval import ItemIndex, brute_force_topn, merge_candidates, set_faiss_threads
from eimf.evaluation.evaluate import evaluate, history_batch, item_popularity, most_popular

__all__ = [
    "MetricAccumulator",
    "hit_matrix",
    "hitrate_at_n",
    "ndcg_at_n",
    "recall_at_n",
    "user_metrics",
    "ItemIndex",
    "brute_force_topn",
    "merge_candidates",
    "set_faiss_threads",
    "evaluate",
    "history_batch",
    "item_popularity",
    "most_popular",
]
