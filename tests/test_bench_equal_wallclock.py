"""The anchors' log formats (bench/anchors.py) read on lines of their own committed logs, and the
equal-wallclock bench's reference arm, steady-state rule and paired comparison on a fake script."""

from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import anchors  # noqa: E402
from bench import equal_wallclock as W  # noqa: E402

LOGS = anchors.ANCHOR_DIR


def _log_lines(name: str, file: str) -> list[str]:
    path = LOGS / name / file
    if not path.is_file():
        pytest.skip(f"{path} is absent (the anchors live in ../shared)")
    return path.read_text().splitlines()


def test_each_anchors_step_and_post_ema_lines_are_read_from_its_own_log():
    a535 = anchors.get("pr535")
    lines = _log_lines("pr535", "train.log")
    steps = [a535.parse_step(line, 786432) for line in lines if a535.parse_step(line, 786432)]
    assert steps[0] == (1, 6.9305, 165.0)
    assert [a535.parse_post_ema(x) for x in lines if a535.parse_post_ema(x)] == [(1.9218, 1.1382)]
    a2135 = anchors.get("pr2135")
    lines = _log_lines("pr2135", "train_seed42.log")
    steps = [a2135.parse_step(line, 786432) for line in lines if a2135.parse_step(line, 786432)]
    step, loss, ms = steps[5]  # "500/20000 train_loss: 2.5705 train_time: 0.8m tok/s: 8341171"
    assert (step, loss) == (500, 2.5705) and ms == pytest.approx(500 * 786432 / 8341171 * 1000)
    assert ms / 60000 == pytest.approx(0.8, abs=0.05)  # agrees with the minutes it printed
    assert [a2135.parse_post_ema(x) for x in lines if a2135.parse_post_ema(x)] == [(2.32046400, 1.06026908)]
    assert a2135.parse_step("0/20000 val_loss: 9.0076 val_bpb: 4.1158", 786432) is None
    # the last step is logged only on the wallclock-cap line (PR #2135 puts a space after each colon)
    assert [a535.parse_stop(x) for x in _log_lines("pr535", "train.log") if a535.parse_stop(x)] == [(6747, 600014.0)]
    assert [a2135.parse_stop(x) for x in lines if a2135.parse_stop(x)] == [(5001, 599672.0)]
    with pytest.raises(ValueError, match="--anchor 'pr9'"):
        anchors.get("pr9")


def test_steady_state_drops_the_first_steps_and_stalls():
    marks = [(1, 50.0), (10, 950.0), (35, 3450.0), (60, 5950.0), (85, 9950.0), (110, 12450.0)]
    assert W.steady(marks) == 100.0  # 60 -> 85 holds a 1.5 s stall (an evaluation): dropped
    assert W.steady([(1, 5.0)]) is None
    line = "step:10/150 train_loss:5.7175 lr_scale:1.0000 tok/s:10,798 step_avg:758.7ms train_time:7.6s eta:106s"
    assert W.PGOLF_STEP.match(line).groups() == ("10", "5.7175", "758.7")  # pgolf's step line: step, loss, avg ms


FAKE_2135 = textwrap.dedent("""
    import os, time
    assert os.environ["MAX_WALLCLOCK_SECONDS"] == "180.0" and os.environ["CASEOPS_ENABLED"] == "1"
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == os.environ["STUB_EXPECTED"]
    batch = 786432
    for s in range(1, 201):
        if s <= 5 or s % 25 == 0:
            print(f"{s}/20000 train_loss: {3 - s / 1000:.4f} train_time: 0.1m tok/s: {batch * s / (s * 0.5):.0f}",
                  flush=True)
    print("212/20000 val_loss: 2.6000 val_bpb: 1.2500", flush=True)
    print("stopping_early: wallclock_cap train_time: 180012ms step: 212/20000", flush=True)
    print("diagnostic pre-quantization post-ema val_loss:2.50000000 val_bpb:1.20000000 eval_time:1ms", flush=True)
    time.sleep(60)  # GPTQ and the rest: not waited for
""")


def fake_pr2135(tmp_path, monkeypatch, text: str) -> anchors.Anchor:
    """The pr2135 anchor with `text` as its script (under tmp_path, also the stand-in's folder)."""
    script = tmp_path / "pr2135" / "train_gpt.py"
    script.parent.mkdir()
    script.write_text(text)
    monkeypatch.setattr(anchors, "ANCHOR_DIR", tmp_path)
    monkeypatch.setenv("STUB_EXPECTED", str(tmp_path))
    return anchors.get("pr2135")


def test_the_reference_arm_runs_the_script_with_its_settings_and_stops_at_the_post_ema_line(tmp_path, monkeypatch):
    anchor = fake_pr2135(tmp_path, monkeypatch, FAKE_2135)
    r = W.run_reference(anchor, tmp_path, 1337, 180.0, 786432, timeout=30, stub_dir=tmp_path)
    assert r["steps"] == 212 and r["step_ms_steady"] == 500.0 and r["post_ema_val_bpb"] == 1.2
    assert r["train_seconds"] == 180.0 and r["log_tail"] == []  # from the wallclock-cap line, not step 200's
    assert r["live_step_val_loss_val_bpb"] == (212, 2.6, 1.25)  # the live weights, not the post-EMA line
    assert r["loss_curve"][:2] == [[1, 2.999], [2, 2.998]] and r["loss_curve"][-1] == [200, 2.8]
    assert W.LIVE_LINE.match("step:4000/20000 val_loss:2.0462 val_bpb:1.2119 train_time:355161ms").groups() == (
        "4000", "2.0462", "1.2119")  # PR #535's form


def test_the_comparison_pairs_seeds_and_states_the_target():
    def arm(name, seed, bpb):
        return {"arm": name, "seed": seed, "post_ema_val_bpb": bpb, "post_ema_val_loss": bpb * math.log(2) * 3.0}

    c = W.comparison([arm("reference", 1, 1.30), arm("pgolf", 1, 1.20), arm("reference", 2, 1.31), arm("pgolf", 2, 1.22)])
    assert c["seeds"] == [1, 2] and c["no_higher"] and c["improvement_nats_mean"] == pytest.approx(0.095 * math.log(2) * 3)
    c = W.comparison([arm("reference", 1, 1.30), arm("pgolf", 1, 1.31), arm("reference", 2, 1.31), arm("pgolf", 2, 1.2)])
    assert not c["no_higher"] and not c["significant"]
    assert W.comparison([arm("reference", 1, 1.3), arm("pgolf", 2, 1.2)])["test"] is None  # one run per arm


def test_pgolf_params_are_the_anchor_profile_on_the_shards_one_gpu_checked(tmp_path):
    p = W.pgolf_params(replace(anchors.get("pr1072")), tmp_path, 42, 180.0, 786432, {"train.log_every": 10})
    assert p["train"]["seed"] == 42 and p["train"]["nproc_per_node"] == 1 and p["train"]["max_wallclock_seconds"] == 180.0
    assert p["prepare"]["corpus"] == str(tmp_path) and p["train"]["log_every"] == 10
    with pytest.raises(ValueError, match="train.nope"):
        W.pgolf_params(anchors.get("pr1072"), tmp_path, 42, 180.0, 786432, {"train.nope": 1})


def test_calls_of_single_arms_merge_into_one_paired_result(tmp_path):
    import json

    head = {"what": "pr2135 script vs pgolf", "seconds": 180.0, "batch_tokens": 786432, "device": "NVIDIA H100"}

    def call(name, arm, seed, bpb):
        path = tmp_path / name
        path.write_text(json.dumps({**head, "seeds": [seed], "results": [
            {"arm": arm, "seed": seed, "post_ema_val_bpb": bpb, "post_ema_val_loss": bpb * math.log(2) * 3.0}]}))
        return path

    files = [call("a.json", "reference", 1, 1.30), call("b.json", "pgolf", 1, 1.25),
             call("c.json", "reference", 2, 1.31), call("d.json", "pgolf", 2, 1.27)]
    out = tmp_path / "all.json"
    assert W.main(["--merge", *map(str, files), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["seeds"] == [1, 2] and len(res["results"]) == 4 and res["comparison"]["no_higher"]
    bad = tmp_path / "e.json"
    bad.write_text(json.dumps({**head, "device": "NVIDIA H200", "results": []}))
    with pytest.raises(ValueError, match="differ in 'device'"):
        W.merge(files + [bad])
    failed = tmp_path / "f.json"  # pgolf seed 1 failed in a call before the one that ran it
    failed.write_text(json.dumps({**head, "results": [{"arm": "pgolf", "seed": 1, "error": "no metrics"}]}))
    res = W.merge([failed] + files)
    assert len(res["results"]) == 4 and res["retried"] == [{"arm": "pgolf", "seed": 1, "error": "no metrics"}]
    with pytest.raises(ValueError, match=r"\('pgolf', 2\) have results in two files"):
        W.merge(files + [files[-1]])


FAKE_2135_POST = FAKE_2135.replace("time.sleep(60)  # GPTQ and the rest: not waited for\n", textwrap.dedent("""
    assert os.environ.get("EVAL_SEQ_LEN", "2560") == "2560"  # its logged length, not the 2048 override
    print("Total submission size quantized+pergroup: 15947490 bytes", flush=True)
    print("diagnostic quantized val_loss:2.60000000 val_bpb:1.25000000 eval_time:10347ms", flush=True)
    print("quantized_ttt_phased val_loss:2.40000000 val_bpb:1.15000000 eval_time:540111ms", flush=True)
"""))
assert FAKE_2135_POST != FAKE_2135


def test_with_post_the_reference_runs_to_its_end_and_reports_its_final_score(tmp_path, monkeypatch):
    anchor = fake_pr2135(tmp_path, monkeypatch, FAKE_2135_POST)
    r = W.run_reference(anchor, tmp_path, 1337, 180.0, 786432, timeout=30, stub_dir=tmp_path, post=True)
    assert r["post_ema_val_bpb"] == 1.2 and r["final_val_bpb"] == 1.15 and r["final_eval_seconds"] == 540.111
    assert r["total_bytes"] == 15947490 and list(r["evals"]) == [
        "diagnostic pre-quantization post-ema", "diagnostic quantized", "quantized_ttt_phased"]
    assert r["evals"]["diagnostic quantized"]["val_bpb"] == 1.25


def test_with_post_the_comparison_pairs_the_final_scores():
    def arm(name, seed, post_ema, final):
        return {"arm": name, "seed": seed, "post_ema_val_bpb": post_ema, "post_ema_val_loss": post_ema * 2.0,
                "final_val_bpb": final, "final_val_loss": final * 2.0}

    rows = [arm("reference", 1, 1.2, 1.10), arm("pgolf", 1, 1.3, 1.05), arm("reference", 2, 1.2, 1.11),
            arm("pgolf", 2, 1.3, 1.07)]
    assert W.comparison(rows, "final")["no_higher"] and W.comparison(rows, "final")["on"] == "final"
    assert not W.comparison(rows)["no_higher"]  # post-EMA: pgolf higher
