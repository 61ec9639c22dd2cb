"""The per-user paired bootstrap (eimf.evaluation.compare) and the per-user metrics it reads."""
import numpy as np
import pandas as pd
import pytest

from eimf.evaluation.compare import paired_bootstrap
from eimf.evaluation.metrics import MetricAccumulator


def _arm(values_by_seed):
    return {s: pd.DataFrame({"user": np.arange(len(v)), "recall@50": v}) for s, v in values_by_seed.items()}


def test_a_real_gain_has_an_interval_above_zero_and_noise_does_not():
    rng = np.random.default_rng(0)
    base = {s: rng.uniform(0, 1, 2000) for s in (1, 2, 3)}
    gain = {s: np.clip(v + 0.05 + rng.normal(0, 0.1, v.size), 0, 1) for s, v in base.items()}
    noise = {s: np.clip(v + rng.normal(0, 0.1, v.size), 0, 1) for s, v in base.items()}
    up = paired_bootstrap(_arm(gain), _arm(base), "recall@50", n_boot=2000)
    assert up.verdict == "gain" and 0.03 < up.delta < 0.06 and up.low > 0 and up.n_users == 2000
    assert up.seeds == [1, 2, 3] and all(d > 0.02 for d in up.per_seed.values())
    flat = paired_bootstrap(_arm(noise), _arm(base), "recall@50", n_boot=2000)
    assert flat.low < 0 < flat.high and flat.verdict == "no difference"
    down = paired_bootstrap(_arm(base), _arm(gain), "recall@50", n_boot=2000)
    assert down.verdict == "loss"


def test_users_and_seeds_are_paired_and_averaged_first():
    # seed 3 ran only for the treated arm: it is left out; user 2 lacks seed 2 in control: left out
    treated = {1: pd.DataFrame({"user": [0, 1, 2], "recall@50": [1.0, 0.0, 1.0]}),
               2: pd.DataFrame({"user": [0, 1, 2], "recall@50": [0.0, 1.0, 1.0]}),
               3: pd.DataFrame({"user": [0, 1, 2], "recall@50": [1.0, 1.0, 1.0]})}
    control = {1: pd.DataFrame({"user": [0, 1, 2], "recall@50": [0.0, 0.0, 0.0]}),
               2: pd.DataFrame({"user": [0, 1], "recall@50": [0.0, 0.0]})}
    d = paired_bootstrap(treated, control, "recall@50", n_boot=200)
    assert d.seeds == [1, 2] and d.n_users == 2
    assert d.delta == pytest.approx(0.5)  # users 0 and 1 each average 0.5 over seeds 1-2, against 0
    assert d.per_seed == {1: pytest.approx(2 / 3), 2: pytest.approx(0.5)}  # each seed on its own common users


def test_bad_inputs_say_what_is_wrong():
    one = {1: pd.DataFrame({"user": [0], "recall@50": [1.0]})}
    with pytest.raises(ValueError, match="no seed in common"):
        paired_bootstrap(one, {2: one[1]}, "recall@50")
    with pytest.raises(KeyError, match="ndcg@50"):
        paired_bootstrap(one, one, "ndcg@50")
    with pytest.raises(ValueError, match="repeats users"):
        paired_bootstrap({1: pd.DataFrame({"user": [0, 0], "recall@50": [1.0, 0.0]})}, one, "recall@50")


def test_per_user_metrics_average_to_the_result():
    acc = MetricAccumulator(topk=(2, 3), keep_users=True)
    recs = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    acc.add(recs[:2], [[2], [9]], users=[10, 11])
    acc.add(recs[2:], [[7, 1]], users=[12])
    table, result = acc.per_user(), acc.result()
    assert table["user"].tolist() == [10, 11, 12]
    assert table["recall@2"].tolist() == [1.0, 0.0, 0.5]
    for col in table.columns.drop("user"):
        assert table[col].mean() == pytest.approx(result[col])
    with pytest.raises(ValueError, match="one user id per row"):
        acc.add(recs[:1], [[1]])
    with pytest.raises(RuntimeError, match="keep_users"):
        MetricAccumulator().per_user()


def test_delta_by_quartile_finds_where_the_gain_is():
    from eimf.evaluation.compare import delta_by_quartile, user_features

    rng = np.random.default_rng(1)
    n = 2000
    length = pd.Series(rng.integers(1, 100, n), index=np.arange(n))
    base = {s: rng.uniform(0, 0.5, n) for s in (1, 2)}
    # a gain only for the shortest histories
    gain = {s: v + np.where(length.to_numpy() <= length.quantile(0.25), 0.1, 0.0) + rng.normal(0, 0.02, n)
            for s, v in base.items()}
    rows = delta_by_quartile(_arm(gain), _arm(base), "recall@50", length, n_boot=500)
    assert [r["quartile"] for r in rows] == [1, 2, 3, 4] and sum(r["users"] for r in rows) == n
    assert rows[0]["verdict"] == "gain" and rows[0]["delta"] > 0.08
    assert all(r["verdict"] == "no difference" for r in rows[2:])

    split = pd.DataFrame({"user": [1, 2], "history": [[1, 2, 3], [4]], "truth": [[1], [2, 9]]})
    train = pd.DataFrame({"items": [[1, 1, 2], [1, 3]]})
    f = user_features(split, train)
    assert f["history_length"].tolist() == [3, 1] and f["target_popularity"].tolist() == [3.0, 0.5]


def test_compare_job_pairs_two_grids_by_seed(tmp_path, capsys):
    """jobs/compare.py: two .jsonl grids, paired by (dataset, model, seed), from their per-user tables."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import compare

    rng = np.random.default_rng(2)
    files = {}
    for arm, shift in (("a", 0.05), ("b", 0.0)):
        rows = []
        for seed in (1, 2):
            r50 = rng.uniform(0, 0.5, 500) + shift
            path = tmp_path / f"{arm}{seed}.test.parquet"
            pd.DataFrame({"user": np.arange(500), "recall@50": r50}).to_parquet(path)
            rows.append({"dataset": "d", "model": "m", "seed": seed, "run": f"{arm}{seed}",
                         "metrics": {"test/recall@50": float(r50.mean())}, "per_user": {"test": str(path)}})
        rows.append({"dataset": "d", "model": "m", "seed": 3, "run": f"{arm}3", "metrics": {}}) if arm == "a" else None
        files[arm] = tmp_path / f"{arm}.jsonl"
        files[arm].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "cmp.md"
    assert compare.main(["--treated", str(files["a"]), "--control", str(files["b"]), "--metrics", "recall@50",
                         "--n-boot", "300", "--work-dir", str(tmp_path / "w"), "--output", str(out)]) == 0
    line = [x for x in out.read_text().splitlines() if "| recall@50 |" in x][0]
    cells = [c.strip() for c in line.strip("| ").split(" | ")]
    assert cells[2] == "1 2" and cells[8] == "gain"  # seed 3 has no control: left out
