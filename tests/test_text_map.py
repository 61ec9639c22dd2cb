"""The text map (eimf.models.text_map): a ridge map from item text embeddings to trained rows."""
import numpy as np
import pytest

from eimf.models.text_map import TextMap, fit_text_map, table_blocks


def _planted(n=3000, d_text=32, dim=8, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 1, d_text)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[0] = 0
    w = rng.normal(size=(d_text, dim))
    y = (x @ w + 0.3 + noise * rng.normal(size=(n + 1, dim))).astype(np.float32)
    y[0] = 0
    counts = rng.integers(1, 100, size=n + 1)
    return x, y, w, counts


def test_the_map_recovers_a_planted_linear_map_and_scores_held_out_items():
    x, y, w, counts = _planted()
    m = fit_text_map(table_blocks(x, lambda ids: y[ids], counts, block=700), "enc")
    assert m.fit["heldout_items"] == pytest.approx(300, abs=40)
    assert m.fit["heldout_cosine"] > 0.99
    fresh = np.random.default_rng(9).normal(size=(5, x.shape[1])).astype(np.float32)
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)  # unit rows, as the encoder's
    np.testing.assert_allclose(m.apply(fresh, norm_percentile=None), fresh @ w + 0.3, atol=0.05)
    median = m.fit["row_norms"]["50"]  # by default, rows keep the map's direction at the median trained norm
    np.testing.assert_allclose(np.linalg.norm(m.apply(fresh), axis=1), median, rtol=1e-5)


def test_the_penalty_grows_when_the_rows_are_noise():
    x, _, _, counts = _planted()
    noise = np.random.default_rng(3).normal(size=(len(x), 8)).astype(np.float32)
    m = fit_text_map(table_blocks(x, lambda ids: noise[ids], counts), "enc")
    assert m.fit["alpha"] >= 0.1  # nothing to learn: the largest penalties do least harm on held-out items
    assert abs(m.fit["heldout_cosine"]) < 0.2


def test_items_without_text_are_left_out_of_the_fit_and_bad_shapes_are_refused():
    x, y, _, counts = _planted(n=500)
    x[1:250] = 0  # no text
    m = fit_text_map(table_blocks(x, lambda ids: y[ids], counts), "enc")
    assert m.fit["items"] == 251  # items 250..500
    with pytest.raises(ValueError, match="expected \\[M, 32\\]"):
        m.apply(np.zeros((2, 31)))
    with pytest.raises(ValueError, match="weighting"):
        fit_text_map(table_blocks(x, lambda ids: y[ids], counts), "enc", weighting="nope")


def test_the_map_round_trips_through_its_arrays():
    x, y, _, counts = _planted(n=400)
    m = fit_text_map(table_blocks(x, lambda ids: y[ids], counts), "enc")
    back = TextMap.from_arrays(m.to_arrays())
    np.testing.assert_array_equal(back.apply(x[1:5]), m.apply(x[1:5]))
    assert back.encoder == "enc" and back.fit == m.fit


def test_rows_can_be_stretched_to_a_percentile_of_the_trained_norms():
    x, y, _, counts = _planted(n=800)
    m = fit_text_map(table_blocks(x, lambda ids: y[ids], counts), "enc")
    target = np.percentile(np.linalg.norm(y[1:], axis=1), 75)
    assert m.fit["row_norms"]["75"] == pytest.approx(target, rel=1e-5)
    np.testing.assert_allclose(np.linalg.norm(m.apply(x[1:4], norm_percentile=75), axis=1), target, rtol=1e-5)
    with pytest.raises(ValueError, match="percentile"):
        m.apply(x[1:4], norm_percentile=60)
