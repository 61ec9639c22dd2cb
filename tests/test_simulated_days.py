"""Simulated days (eimf.experiments.simulated_days): the cutoffs, the next slice's users, and scoring a model on
raw ids it only partly knows."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from eimf.experiments import simulated_days as sd


def _log(rows):
    return pd.DataFrame(rows, columns=["user", "item", "ts"]).astype({"user": str, "item": str, "ts": float})


def test_cutoffs_cut_the_log_at_shares_of_its_interactions():
    ts = np.arange(100, dtype=np.float64)
    cuts = sd.day_cutoffs(ts, [0.5, 0.8])
    assert cuts == pytest.approx([49.5, 79.2])
    assert (ts < cuts[0]).sum() == 50 and ((ts >= cuts[0]) & (ts < cuts[1])).sum() == 30
    for bad in ([], [0.5, 0.5], [0.8, 0.5], [0.0, 0.5], [0.5, 1.0]):
        with pytest.raises(ValueError, match="shares"):
            sd.day_cutoffs(ts, bad)
    with pytest.raises(ValueError, match="too coarse"):  # day-resolution stamps: two shares on one day
        sd.day_cutoffs(np.repeat([1.0, 2.0], 50), [0.6, 0.7])


def test_the_next_slice_holds_active_users_with_a_past_their_history_before_it_and_its_distinct_items():
    log = _log([("a", "1", 1), ("a", "2", 2), ("a", "3", 3), ("a", "4", 5), ("a", "4", 6), ("a", "5", 7),
                ("a", "9", 20),  # after the slice: neither history nor truth
                ("b", "7", 6),  # active, but no past: left out
                ("c", "8", 1),  # a past, but not active: left out
                ("d", "2", 4), ("d", "1", 5)])
    f = sd.next_slice_frame(log.sample(frac=1, random_state=0), start=5, end=10, maxlen=2)
    by = f.set_index("raw_user")
    assert list(by.index) == ["a", "d"]
    assert list(by.loc["a", "history"]) == ["2", "3"]  # the last maxlen before the slice, oldest first
    assert list(by.loc["a", "truth"]) == ["4", "5"]  # distinct, in order
    assert list(by.loc["d", "history"]) == ["2"] and list(by.loc["d", "truth"]) == ["1"]
    assert sorted(f["user"]) == [0, 1]


def test_model_ids_drop_unknown_history_and_keep_unknown_truth_out_of_reach():
    frame = pd.DataFrame({"user": [0, 1, 2], "history": [["x", "a"], ["x"], ["b"]],
                          "truth": [["b", "y", "z"], ["a"], ["y", "c"]]})
    sub = sd.to_model_ids(frame, np.array(["a", "b", "c"]))  # model ids 1, 2, 3
    assert list(sub["user"]) == [0, 2]  # user 1 knows nothing of its history
    assert [list(h) for h in sub["history"]] == [[1], [2]]
    t0, t2 = (list(t) for t in sub["truth"])
    assert t0[0] == 2 and min(t0[1:]) > 3 and t0[1] != t0[2]
    assert t2[0] == t0[1] and t2[1] == 3  # the same unknown raw id, the same id past the table


class _Planted(torch.nn.Module):
    """Each item's row is one-hot; a user's one interest is the row of the item after its last one."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def item_embeddings(self):
        return torch.cat([torch.zeros(1, self.n), torch.eye(self.n)])

    def interests(self, hist, mask):
        last = hist.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
        return self.item_embeddings()[(last % self.n) + 1].unsqueeze(1)


def test_a_model_is_scored_over_its_own_catalogue_with_unknown_truth_as_misses():
    folder = SimpleNamespace(items=pd.DataFrame({"item": [3, 1, 2], "raw_id": ["c", "a", "b"]}), model=_Planted(3))
    frame = pd.DataFrame({"user": [0, 1, 2], "history": [["a"], ["b"], ["nope"]],
                          "truth": [["b"], ["c", "new"], ["a"]]})
    per_user, scored = sd.score_folder(folder, frame, maxlen=5, topk=(1,))
    got = per_user.set_index("user")["recall@1"]
    assert got.to_dict() == {0: 1.0, 1: 0.5}  # user 1: the unknown item counts in its truth and is never found
    assert scored == {"users": 2, "users_without_known_history": 1, "catalogue": 3,
                      "truth_known_share": pytest.approx(2 / 3)}


def test_the_report_has_a_row_per_day_and_arm_and_pairs_warm_with_scratch_and_stale():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "days_job", Path(__file__).resolve().parents[1] / "jobs" / "simulated_days.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    rng = np.random.default_rng(0)
    arms, rows = {}, []
    for seed in (1, 2):
        for day, arm in ((0, "day0"), (1, "warm"), (1, "scratch"), (1, "stale")):
            users = np.arange(50)
            lift = 0.2 if arm == "warm" else 0.0
            df = pd.DataFrame({"user": users, "recall@20": rng.random(50) * 0.1, "ndcg@50": rng.random(50) * 0.1,
                               "recall@50": np.clip(rng.random(50) * 0.5 + lift, 0, 1)})
            arms.setdefault((day, arm), {})[seed] = df
            trained = arm != "stale"
            rows.append({"day": day, "arm": arm, "seed": seed, "trained_on": "x", "users": 50, "catalogue": 10,
                         "truth_known_share": 0.5, "metrics": {k: float(df[k].mean()) for k in df if "@" in k},
                         "steps": 100 if trained else None, "best_step": 50 if trained else None,
                         "train_seconds": 60.0 if trained else None})
    lines = job.report_tables(rows, arms)
    table = [line for line in lines if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert [line.split(" | ")[2] for line in table[:4]] == ["day0", "warm", "scratch", "stale"]
    assert "100 (50)" in table[1] and "1.0 ± 0.0" in table[1] and table[3].endswith("| — | — |")
    verdicts = {(line.split(" | ")[1], line.split(" | ")[2]): line.split(" | ")[-1] for line in lines
                if " − " in line}
    assert verdicts[("recall@50", "warm − scratch")].startswith("gain")
    assert ("recall@50", "scratch − stale") in verdicts
