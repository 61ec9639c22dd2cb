"""model.item_init=text: the item table from the item texts (eimf.models.text_init), on a synthetic catalogue."""
import math

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def synthetic_prepared(tmp_path_factory):
    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.data.synthetic import custom_overrides, synthesize

    root = tmp_path_factory.mktemp("textinit")
    synthesize(str(root / "synth"), users=300, items=400, interactions=6000, seed=1, clusters=8)
    cfg = load_config(None, custom_overrides(str(root / "synth")) + [f"data.output_dir={root / 'prepared'}"])
    return prepare(cfg.data, engine="local")


def test_text_table_has_the_init_spread_and_the_topics_geometry(synthetic_prepared, tmp_path, monkeypatch):
    from eimf.models.text_init import text_init_table

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    data = synthetic_prepared
    path = text_init_table(str(data.path), 16, "all-MiniLM-L6-v2")
    table = np.load(path)
    assert table.shape == (data.n_items + 1, 16) and table.dtype == np.float32
    assert not table[0].any()  # padding
    target = math.sqrt(6.0 / (data.n_items + 1 + 16)) / math.sqrt(3.0)
    assert table[1:].std() == pytest.approx(target, rel=0.2)
    # titles name their topic ("vintage jazz records #12"): same-topic items are closer than others
    topic = data.items.set_index("item")["text"].str.rsplit(" #", n=1).str[0]
    ids = topic.index.to_numpy()
    unit = table[ids] / np.linalg.norm(table[ids], axis=1, keepdims=True)
    sim = unit @ unit.T
    same = topic.to_numpy()[:, None] == topic.to_numpy()[None, :]
    off = ~np.eye(len(ids), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.3
    assert text_init_table(str(data.path), 16, "all-MiniLM-L6-v2") == path  # cached


def test_load_item_init_copies_the_table_and_checks_its_shape():
    from eimf.models import ComiRecSA
    from eimf.training.components import load_item_init

    model = ComiRecSA(9, dim=4, num_interests=2, maxlen=5)
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    load_item_init(model, table)
    assert torch.equal(model.item_emb.weight.detach(), torch.from_numpy(table))
    with pytest.raises(ValueError, match="item table"):
        load_item_init(model, table[:5])
