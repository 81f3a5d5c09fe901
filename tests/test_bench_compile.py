"""The compile-time benchmark (bench/bench_compile.py) on CPU: both compile scopes, cold and warm,
each in its own process, and its argument checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_compile as C  # noqa: E402


def test_runs_both_scopes_cold_and_warm(tmp_path):
    out = tmp_path / "compile.json"
    C.main(["--profile", str(ROOT / "profiles" / "tiny.yaml"), "--batch", "1x32", "--steps", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["profile"] == "profiles/tiny.yaml"  # a file of only differences, resolved
    assert r["backend"] == "aot_eager" and r["batch"] == [1, 32] and r["versions"]["torch"]
    assert set(r["runs"]) == {"model", "blocks"}
    for scope, runs in r["runs"].items():
        for state in ("cold", "warm"):
            run = runs[state]
            assert run["first_step_seconds"] > 0 and run["later_step_seconds"] > 0, (scope, state)
            assert run["phase_seconds"]["bytecode_tracing"] > 0
    assert r["runs"]["model"]["cold"]["graphs"] == 1  # the whole forward and loss
    # the tiny model's blocks: first (two inputs, one tensor), plain, value embedding; the loss
    assert r["runs"]["blocks"]["cold"]["graphs"] == 4


@pytest.mark.parametrize("argv, msg", [(["--batch", "12"], "--batch must be BxT"),
                                       (["--batch", "0x8"], "B, T >= 1"),
                                       (["--steps", "0"], "--steps must be >= 1"),
                                       (["--scopes", "model,layers"], "unknown ['layers']")])
def test_bad_arguments_are_named(argv, msg):
    with pytest.raises(SystemExit, match=msg.replace("[", r"\[").replace("]", r"\]")):
        C.main(argv)


def test_a_missing_profile_is_named_before_any_run(monkeypatch):
    monkeypatch.setattr(C, "run_child", lambda *a: pytest.fail("ran a child"))
    with pytest.raises(ValueError, match="profiles/nope.yaml: no such profile"):
        C.main(["--profile", "nope", "--steps", "1"])
