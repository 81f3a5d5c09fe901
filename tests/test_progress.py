"""pgolf.shared.progress: a bar on a terminal, plain periodic lines (count/total, rate, ETA) otherwise;
the evaluation loop reports through it when stderr is not a terminal."""

from __future__ import annotations

import io

import numpy as np

from pgolf.shared import bpb, progress
from pgolf.shared.progress import Progress, track


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    assert list(track(range(4), desc="eval", unit="batch", stream=out, interval_s=0.0)) == [0, 1, 2, 3]
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # one per item, then "done"
    assert lines[1].startswith("eval: 2/4 batch (50%), ") and "batch/s" in lines[1] and "ETA" in lines[1]
    assert lines[-1].startswith("eval: 4/4 batch (100%), ") and lines[-1].endswith(", done")


def test_quiet_for_short_loops_and_unknown_totals():
    out = io.StringIO()
    list(track(range(3), desc="eval", unit="batch", stream=out, interval_s=3600.0))
    assert out.getvalue() == ""
    p = Progress("encode", "doc", stream=out, interval_s=0.0)
    p.update(10)
    p.close()
    assert out.getvalue().splitlines()[0].startswith("encode: 10 doc, ")


def test_a_bar_on_a_terminal():
    out = Tty()
    list(track(range(3), desc="eval", unit="batch", stream=out, interval_s=0.0))
    assert "3/3" in out.getvalue() and "ETA" not in out.getvalue()  # tqdm's bar, not the plain lines


def test_evaluation_prints_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    from conftest import tiny_model
    from test_evaluate import tables

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 64, 16 * 8 + 1).astype(np.uint16)
    bpb.eval_sliding(tiny_model(1), tokens, tables(), 16, 8, 4, device="cpu", progress=True)
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("eval: ") for line in err)
    assert err[-1].endswith(", done") and " batch/s" in err[-1]
