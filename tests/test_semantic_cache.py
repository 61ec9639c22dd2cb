"""Annotation cache and the annotate_users orchestration: reruns hit the cache, a killed run resumes without
sending any prompt twice, failures are kept, outputs are written (local and s3://)."""
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from eimf import fs
from eimf.formats.annotations import ANNOTATIONS_FILE, STATS_FILE, read_annotations, semantic_vectors
from eimf.semantic.annotate import annotate_users, build_requests
from eimf.semantic.annotators import Annotator, Generation
from eimf.semantic.cache import AnnotationCache, cache_key
from eimf.semantic.prompts import PROMPT_VERSION


class Killed(Exception):
    pass


class Counting(Annotator):
    """Counts every prompt it is sent (by history hash) and every answer it streams back; dies (as a killed
    process would) after streaming ``die_after`` answers; users listed in ``bad`` always get an invalid answer."""
    kind = "counting"

    def __init__(self, model="fake-1", die_after=None, bad=(), max_attempts=2):
        super().__init__(max_attempts)
        self.model, self.die_after, self.bad = model, die_after, set(bad)
        self.sent, self.answered = [], []

    @property
    def model_id(self):
        return self.model

    def generate_stream(self, requests, attempt):
        for j, g in enumerate(self.generate(requests, attempt)):  # one pass: every prompt submitted at once
            if self.die_after is not None and len(self.answered) >= self.die_after:
                raise Killed("killed")
            self.answered.append(requests[j].history_hash)
            yield [(j, g)]

    def generate(self, requests, attempt):
        out = []
        for r in requests:
            self.sent.append(r.history_hash)
            if r.user in self.bad:
                out.append(Generation(text="no json here", tokens_in=50, tokens_out=3))
                continue
            ans = {"interests": [{"name": f"interest {j} of {r.n_items}", "description": r.item_texts[j - 1][:50],
                                  "evidence": [j]} for j in range(1, min(r.max_interests, r.n_items) + 1)]}
            out.append(Generation(text=json.dumps(ans), tokens_in=50, tokens_out=10))
        return out


class HashEncoder:
    name = "hash-encoder"

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for i, t in enumerate(texts):
            h = hashlib.sha256(t.encode()).digest()
            out[i] = np.frombuffer(h[:16], dtype=np.uint8).astype(np.float32) + 1
        return out


def prepared(n_users=23, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    train = pd.DataFrame({"user": np.arange(1, n_users + 1),
                          "items": [rng.integers(1, n_items + 1, size=int(rng.integers(5, 30))).tolist()
                                    for _ in range(n_users)]})
    train.at[1, "items"] = list(train.at[0, "items"])  # users 1 and 2 share a history: one prompt
    items = pd.DataFrame({"item": np.arange(1, n_items + 1), "raw_id": [str(i) for i in range(1, n_items + 1)],
                          "count": np.ones(n_items, dtype=np.int64),
                          "text": [f"Item {i} (19{50 + i}) | Genre{i % 4}" for i in range(1, n_items + 1)]})
    return SimpleNamespace(train=train, items=items, n_items=n_items)


def run(prep, users, ann, cache_dir, out_dir=None, **kw):
    cache = AnnotationCache(str(cache_dir), ann.model_id)  # a fresh object: state comes from the store
    return annotate_users(prep, users, ann, cache, HashEncoder(), K=3, token_budget=2048, out_dir=out_dir,
                          chunk_size=kw.pop("chunk_size", 5), **kw)


def test_key_and_requests_use_only_training_part():
    prep = prepared()
    reqs, prompts = build_requests(prep, [3, 4], 3, 2048, cut=lambda s: len(s) - 2)
    seq = prep.train.set_index("user").at[3, "items"]
    assert reqs[0].item_ids == seq[:-2] and reqs[0].n_items == len(seq) - 2
    assert cache_key("h", PROMPT_VERSION, "m") != cache_key("h", PROMPT_VERSION, "m2")
    with pytest.raises(KeyError):
        build_requests(prep, [999], 3, 2048)


def test_second_run_hits_cache_for_every_user(tmp_path):
    prep = prepared()
    users = list(range(1, 24))
    ann = Counting()
    df1, s1 = run(prep, users, ann, tmp_path / "cache", out_dir=str(tmp_path / "out1"))
    assert s1["users"] == 23 and s1["prompts"] == 22 and s1["shared_prompts"] == 1 and s1["cache_hits"] == 0
    assert len(ann.sent) == 22 and len(set(ann.sent)) == 22
    assert s1["tokens_in"] == 22 * 50 and s1["failures"] == 0 and s1["valid_share"] == 1.0
    assert len(list((tmp_path / "cache").glob("part-*.parquet"))) == 5  # ceil(22 / 5) crash-safe parts

    ann2 = Counting()
    df2, s2 = run(prep, users, ann2, tmp_path / "cache", out_dir=str(tmp_path / "out2"))
    assert ann2.sent == [] and s2["prompts"] == 0 and s2["cache_hits"] == 23 and s2["tokens_out"] == 0
    cols = ["user", "interest_idx", "name", "description", "status"]
    pd.testing.assert_frame_equal(df1[cols], df2[cols])
    assert df2["cached"].all() and not df1["cached"].any()
    assert all(np.allclose(a, b) for a, b in zip(df1["vector"], df2["vector"]))

    # a different model misses everything
    ann3 = Counting(model="fake-2")
    _, s3 = run(prep, users[:4], ann3, tmp_path / "cache")
    assert s3["cache_hits"] == 0 and len(ann3.sent) == 3  # users 1 and 2 share one prompt


def test_killed_run_then_restart_sends_no_prompt_twice(tmp_path):
    prep = prepared()
    users = list(range(1, 24))
    dying = Counting(die_after=12)
    with pytest.raises(Killed):
        run(prep, users, dying, tmp_path / "cache")
    # one pass took every prompt; 12 answers came back, two batches of 5 were stored, 2 were in flight
    assert len(dying.sent) == 22 and len(dying.answered) == 12
    (tmp_path / "cache" / "_tmp-part-half-written.parquet").write_bytes(b"PAR1 garbage")  # a torn write
    (tmp_path / "cache" / "part-0-corrupt.parquet").write_bytes(b"not parquet")  # and a damaged part

    restart = Counting()
    df, stats = run(prep, users, restart, tmp_path / "cache", out_dir=str(tmp_path / "out"))
    assert stats["cache_hits"] == 11 and stats["prompts"] == 12  # user 2 shares user 1's cached prompt
    assert len(restart.sent) == 12  # the 10 stored answers are not asked again; the 2 in flight are
    stored = dying.answered[:10]
    assert not set(stored) & set(restart.sent) and len(set(stored) | set(restart.sent)) == 22  # none lost
    assert set(df["user"]) == set(users) and (df["status"] == "ok").all()

    third = Counting()
    run(prep, users, third, tmp_path / "cache")
    assert third.sent == []


def test_failures_are_recorded_cached_and_optionally_retried(tmp_path):
    prep = prepared()
    users = [3, 4, 5, 6]
    ann = Counting(bad={4})
    out = tmp_path / "out"
    df, stats = run(prep, users, ann, tmp_path / "cache", out_dir=str(out))
    assert stats["failures"] == 1 and stats["failures_new"] == 1 and stats["attempts"] == 5
    bad = df[df["user"] == 4]
    assert len(bad) == 1 and bad["status"].iloc[0] == "failed" and bad["interest_idx"].iloc[0] == -1
    assert bad["raw_text"].iloc[0] == "no json here" and "not JSON" in bad["error"].iloc[0]
    assert bad["vector"].iloc[0] is None

    # on disk: the failure is there too, with the raw text; vectors are list<float32>
    table = pq.read_table(out / ANNOTATIONS_FILE)
    assert str(table.schema.field("vector").type) == "list<element: float>"
    assert str(table.schema.field("evidence").type) == "list<element: int64>"
    back = read_annotations(str(out))
    assert len(back) == len(df) and (back["status"] == "failed").sum() == 1
    st = json.loads((out / STATS_FILE).read_text())
    for k in ("prompts", "cache_hits", "failures", "tokens_in", "tokens_out", "wall_s", "tokens_per_s"):
        assert k in st
    vecs = semantic_vectors(back)
    assert set(vecs) == {3, 5, 6} and vecs[3].shape[1] == 16
    assert np.allclose(np.linalg.norm(vecs[3], axis=1), 1, atol=1e-5)
    ok = back[back["status"] == "ok"]
    seqs = prep.train.set_index("user")["items"]
    for _, r in ok.iterrows():  # evidence numbers map back to the user's items
        assert list(r["evidence_items"]) == [seqs[r["user"]][n - 1] for n in r["evidence"]]

    again = Counting(bad={4})
    _, s2 = run(prep, users, again, tmp_path / "cache")
    assert again.sent == [] and s2["failures"] == 1  # a cached failure is final by default
    fixed = Counting()
    _, s3 = run(prep, users, fixed, tmp_path / "cache", retry_failed=True)
    assert len(fixed.sent) == 1 and s3["failures"] == 0 and s3["cache_hits"] == 3
    # the ok record now wins over the failed one
    _, s4 = run(prep, users, Counting(), tmp_path / "cache")
    assert s4["failures"] == 0 and s4["prompts"] == 0


def test_cache_rejects_other_models(tmp_path):
    cache = AnnotationCache(str(tmp_path), "m1")
    with pytest.raises(ValueError):
        annotate_users(prepared(), [1], Counting(model="m2"), cache, HashEncoder(), 3, 2048)
    assert cache.put([]) is None and len(cache) == 0


@pytest.mark.timeout(120)
def test_cache_and_outputs_on_s3(moto_s3):
    s3 = moto_s3
    if not s3.exists("eimf-ann"):
        s3.mkdir("eimf-ann")
    prep = prepared()
    ann = Counting()
    _, s1 = run(prep, [3, 4, 5], ann, "s3://eimf-ann/cache", out_dir="s3://eimf-ann/run1")
    assert s1["prompts"] == 3 and fs.exists("s3://eimf-ann/run1/annotations.parquet")
    again = Counting()
    _, s2 = run(prep, [3, 4, 5, 6], again, "s3://eimf-ann/cache")
    assert s2["cache_hits"] == 3 and len(again.sent) == 1
    assert len(read_annotations("s3://eimf-ann/run1")) == 9


def test_annotate_from_config_selects_and_annotates(tmp_path):
    import torch

    from eimf.config import load_config
    from eimf.models import build_model
    from eimf.formats.annotations import SELECTION_FILE
    from eimf.semantic.annotate import annotate_from_config

    prep = prepared()
    cfg = load_config(None, ["model.dim=8", "model.num_interests=3", "model.maxlen=10", "semantic.budget=6",
                             "semantic.n_clusters=3", f"semantic.cache_dir={tmp_path / 'cache'}",
                             "semantic.chunk_size=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model, prep.n_items)
    ann = Counting()
    df, stats = annotate_from_config(cfg, prep, model, str(tmp_path / "run"), annotator=ann, encoder=HashEncoder())
    sel = pd.read_parquet(tmp_path / "run" / SELECTION_FILE)
    assert len(sel) == 6 and set(df["user"]) == set(sel["user"]) and stats["selected"] == 6
    assert stats["selection"] == "typical" and stats["max_interests"] == 3
    assert json.loads((tmp_path / "run" / STATS_FILE).read_text())["selected"] == 6


def test_merged_annotations_take_the_overlay_where_it_answered(tmp_path):
    """coverage: metadata interests for everyone, the LLM's where it answered; a failed LLM answer keeps the
    metadata interests, and stats.json (written last) says what was merged."""
    import json

    import numpy as np
    import pandas as pd

    from eimf.formats.annotations import (annotations_table, merge_annotations, read_annotations, semantic_vectors,
                                          write_parquet)

    def ann(rows):
        df = pd.DataFrame(rows)
        for col, default in (("description", "d"), ("evidence", None), ("evidence_items", None), ("error", None),
                             ("raw_text", None), ("cached", False), ("history_hash", "h"), ("model", "m"),
                             ("prompt_version", "v"), ("window_start", 0), ("window_end", 5)):
            df[col] = [default if not isinstance(default, list) else list(default)] * len(df)
        df["evidence"] = [[] for _ in range(len(df))]
        df["evidence_items"] = [[] for _ in range(len(df))]
        return df

    v = lambda x: np.full(4, x, dtype=np.float32)  # noqa: E731
    base = ann([{"user": u, "interest_idx": 0, "name": f"meta{u}", "vector": v(u), "status": "ok"}
                for u in (1, 2, 3)])
    llm = ann([{"user": 2, "interest_idx": 0, "name": "llm2a", "vector": v(20), "status": "ok"},
               {"user": 2, "interest_idx": 1, "name": "llm2b", "vector": v(21), "status": "ok"},
               {"user": 3, "interest_idx": -1, "name": None, "vector": None, "status": "failed"}])
    write_parquet(annotations_table(base), str(tmp_path / "a" / "annotations.parquet"))
    write_parquet(annotations_table(llm), str(tmp_path / "b" / "annotations.parquet"))
    stats = merge_annotations(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "m"))
    merged = read_annotations(str(tmp_path / "m"))
    assert merged.groupby("user")["name"].apply(list).to_dict() == {1: ["meta1"], 2: ["llm2a", "llm2b"],
                                                                   3: ["meta3"]}
    assert sorted(semantic_vectors(merged)) == [1, 2, 3]
    assert stats["overlay_users"] == 1 and stats["users"] == 3
    assert json.loads((tmp_path / "m" / "stats.json").read_text())["base_users"] == 3


def test_sigkilled_annotation_pass_resumes_without_sending_a_stored_prompt_again(tmp_path):
    """A real kill: the annotating process dies by SIGKILL midway through its one pass. The rerun sends exactly
    the prompts whose answers were not stored (the ones in flight), and every user ends annotated."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    cache_dir, log = tmp_path / "cache", tmp_path / "answered.txt"
    worker = Path(__file__).resolve().parent / "annotate_kill_worker.py"
    proc = subprocess.Popen([sys.executable, str(worker), str(cache_dir), str(log)])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        answered = log.read_text().split() if log.exists() else []
        if len(answered) >= 13:  # two batches of 5 stored, the third in flight
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the worker ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    answered = log.read_text().split()
    stored = AnnotationCache(str(cache_dir), "fake-1")
    n_stored = len(stored)
    assert 10 <= n_stored < len(answered) <= 22  # some answers were lost with the process, never more than a batch
    assert len(answered) - n_stored <= 5

    restart = Counting()
    df, stats = run(prepared(), list(range(1, 24)), restart, cache_dir)
    assert len(restart.sent) == 22 - n_stored  # nothing stored is asked again
    assert n_stored % 5 == 0 and set(restart.sent).isdisjoint(answered[:n_stored])  # batches of 5, in order
    assert set(df["user"]) == set(range(1, 24)) and (df["status"] == "ok").all()  # none lost
