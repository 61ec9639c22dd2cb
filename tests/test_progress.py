"""Progress bars: a local tqdm with total and resume offset outside Ray, off with EIMF_PROGRESS=0."""
from eimf.progress import progress


def test_local_bar_has_a_total_and_starts_where_a_resume_left_off(monkeypatch, capsys):
    monkeypatch.delenv("EIMF_PROGRESS", raising=False)
    bar = progress(100, "train", "step", initial=40)
    bar.update(10)
    assert (bar.total, bar.n) == (100, 50)
    bar.set_postfix_str("loss 1.0")
    bar.close()
    assert "train" in capsys.readouterr().err


def test_bars_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("EIMF_PROGRESS", "0")
    bar = progress(10, "annotate")
    bar.update(3)
    assert bar.n == 3 and not hasattr(bar, "total")
    assert not hasattr(progress(10, "x", enabled=False), "total")
