"""ESIM annotation step: typical users of a warm-up model -> LLM (or metadata) interests -> MiniLM vectors -> Parquet,
with the annotation stats and files logged to MLflow.

    python jobs/annotate.py --model-dir .eimf/runs/<run>/export semantic.annotator=vllm semantic.budget=64
    python jobs/annotate.py data.dataset=ml-1m semantic.annotator=metadata          # random users (no model)
    ray job submit --working-dir . -- python jobs/annotate.py --model-dir ... semantic.vllm.concurrency=4

Arguments: ``--model-dir``, ``--out``, ``--run-name``, ``--config FILE`` and ``key=value`` overrides of
eimf.config.Config (e.g. semantic.vllm.model, semantic.vllm.tensor_parallel_size, semantic.chunk_size).
Run it as its own process: vLLM engine actors are started per Ray Data pass.
"""
import sys

from eimf.cli import main

if __name__ == "__main__":
    sys.exit(main(["annotate", *sys.argv[1:]]))
