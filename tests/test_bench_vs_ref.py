"""The side-by-side benchmark's bookkeeping (bench/bench_vs_ref.py, bench/profile_train.py) on CPU:
how the reference's log is read and stopped, and the steady-state rule both programs share."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_vs_ref as B  # noqa: E402
from bench.profile_train import steady_state  # noqa: E402

FAKE_REF = textwrap.dedent("""
    import os, sys, time
    n = int(os.environ["ITERATIONS"])
    assert os.environ["WARMDOWN_ITERS"] == "0" and os.environ["NCCL_NVLS_ENABLE"] == "0"
    print("warmup_step:1/3", flush=True)
    t = 0
    for s in range(1, n + 1):
        t += 10 + (200 if s == 33 else 0)  # one stall: an online-Hessian pass, say
        if s <= 10 or s % 5 == 0:
            print(f"step:{s}/{n} train_loss:{7 - s / 100:.4f} train_time:{t}ms step_avg:1.0ms", flush=True)
    time.sleep(60)  # what follows training (GPTQ, eval) must not be waited for
""")


def test_reference_log_is_parsed_and_the_run_stopped_after_its_last_step(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE_REF)
    r = B.run_ref(script, tmp_path, 196608, timeout=30, steps=B.steps_for(196608))
    assert r["steps_logged"] == 10 + 18  # steps 1..10, then every 5th up to 100
    assert r["step_ms_steady"] == 10.0  # the interval holding the 200 ms stall is dropped
    assert 50.0 in r["interval_ms_per_step"]  # ... but reported
    assert r["tokens_per_second"] == round(196608 / 10.0 * 1000)
    assert r["loss_curve"][0] == [1, 6.99] and r["loss_curve"][-1] == [100, 6.0]


def test_steps_override_sets_the_references_iterations_and_where_it_is_stopped(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE_REF)
    r = B.run_ref(script, tmp_path, 786432, timeout=30, steps=25)  # default there: 40
    assert r["loss_curve"][-1][0] == 25 and r["steps_logged"] == 10 + 3
    assert B.steps_for(786432) == 40 and B.steps_for(786432, 200) == 200 and B.steps_for(12345) == 100


def test_negative_steps_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_vs_ref", "--data", str(tmp_path), "--out", str(tmp_path / "o.json"),
                                      "--steps", "-1"])
    with pytest.raises(SystemExit):
        B.main()
    assert "--steps must be >= 0, got -1" in capsys.readouterr().err


def test_steady_state_skips_first_steps_and_hessian_intervals():
    marks = [(1, 900.0), (5, 1300.0), (10, 1800.0), (15, 2300.0), (20, 2900.0), (25, 3400.0)]
    kinds = ["n"] * 25
    kinds[17] = "h"  # step 18 captured Hessians: the 15 -> 20 interval is not steady
    med, rates = steady_state(marks, kinds)
    assert med == 100.0 and rates == [100.0, 100.0]


def test_paths_are_resolved_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_vs_ref", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit):
        B.main()


def test_plan_runs_both_programs_per_batch_in_order_then_a_warm_pgolf_run():
    args = argparse.Namespace(batches=[196608], pgolf_extra=[], variants=1, also=[], programs=["pgolf", "reference"])
    assert B.plan(args) == [("pgolf", 196608, []), ("reference", 196608, None),
                                       ("pgolf", 196608, ["--profile-steps", "0"])]
    args = argparse.Namespace(batches=[786432, 196608], pgolf_extra=["--no-hessian"], variants=0, also=[], programs=["pgolf", "reference"])
    assert [(p, b) for p, b, _ in B.plan(args)] == [
        ("pgolf", 786432), ("reference", 786432), ("pgolf", 196608), ("reference", 196608)]


def test_programs_keeps_and_orders_the_runs_it_names():
    args = argparse.Namespace(batches=[786432, 196608], pgolf_extra=[], variants=1, also=[],
                              programs=["reference", "pgolf"])
    assert [(p, b) for p, b, _ in B.plan(args)] == [
        ("reference", 786432), ("pgolf", 786432), ("pgolf", 786432), ("reference", 196608), ("pgolf", 196608)]
    args.programs = ["reference"]
    assert [(p, b) for p, b, _ in B.plan(args)] == [("reference", 786432), ("reference", 196608)]
    args.programs = ["pgolf"]
    assert all(p == "pgolf" for p, _, _ in B.plan(args)) and len(B.plan(args)) == 3


def test_also_adds_pgolf_variants_after_their_batch_pair_and_rejects_bad_entries():
    args = argparse.Namespace(batches=[786432, 196608], pgolf_extra=[], variants=0,
                              also=["196608 train.grad_accum_steps=2", "786432 train.grad_accum_steps=4"],
                              programs=["pgolf", "reference"])
    assert B.plan(args) == [
        ("pgolf", 786432, []), ("reference", 786432, None),
        ("pgolf", 786432, ["--set", "train.grad_accum_steps=4", "--profile-steps", "0"]),
        ("pgolf", 196608, []), ("reference", 196608, None),
        ("pgolf", 196608, ["--set", "train.grad_accum_steps=2", "--profile-steps", "0"])]
    for bad in ("1234 train.grad_accum_steps=2", "196608", "196608 grad_accum_steps", "x train.a=1"):
        args.also = [bad]
        with pytest.raises(ValueError, match="--also"):
            B.plan(args)


def test_section_key_value_overrides_are_parsed_once_for_every_bench():
    from bench import overrides
    from bench.profile_train import record_configs

    assert overrides.parse(["train.iterations=5", "model.smear_bos_mask=true"], "--x") == {
        "train.iterations": 5, "model.smear_bos_mask": True}
    for bad in ("train.iterations", "iterations=5", ".x=1", "train.=1"):
        with pytest.raises(ValueError, match=rf"--x '{re.escape(bad)}': want section.key=value"):
            overrides.parse([bad], "--x")
    _, tcfg = record_configs(["train.grad_accum_steps=2"])
    assert tcfg.grad_accum_steps == 2
    with pytest.raises(ValueError, match="--set 'grad_accum_steps=2'"):
        record_configs(["grad_accum_steps=2"])
    with pytest.raises(ValueError, match=r"--set: 'train.grad_acum_steps' is not a key of profiles/record.yaml"):
        record_configs(["train.grad_acum_steps=2"])  # one check for --set and the ablation rows


FAKE_2135 = textwrap.dedent("""
    import os, time
    n, batch = int(os.environ["ITERATIONS"]), int(os.environ["TRAIN_BATCH_TOKENS"])
    assert os.environ["WARMDOWN_FRAC"] == "0" and os.environ["CASEOPS_ENABLED"] == "1"
    for s in range(1, n + 1):
        if s <= 5 or s % 5 == 0:  # its clock: cumulative tokens per second, 40 ms a step
            print(f"{s}/{n} train_loss: {3 - s / 100:.4f} train_time: 0.0m tok/s: {batch / 0.04:.0f}", flush=True)
    time.sleep(60)
""")


def test_another_anchors_log_format_and_settings_are_used(tmp_path):
    from bench import anchors

    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE_2135)
    r = B.run_ref(script, tmp_path, 196608, timeout=30, steps=40, anchor=anchors.get("pr2135"))
    assert r["steps_logged"] == 5 + 7 and r["step_ms_steady"] == pytest.approx(40.0)
    assert r["loss_curve"][-1] == [40, 2.6] and r["seconds_to_first_step"] is not None


FAKE_MUON = textwrap.dedent("""
    import os, time, torch
    n = int(os.environ["ITERATIONS"])
    class Muon(torch.optim.SGD):
        pass
    w = torch.nn.Parameter(torch.ones(3))
    opt = Muon([w], lr=0.1)
    saved = opt.state_dict()
    for _ in range(4):  # its compile warm-up, then the restore
        (w * w).sum().backward(); opt.step()
    opt.load_state_dict(saved)
    for s in range(1, n + 1):
        (w * w).sum().backward(); opt.step()
        print(f"step:{s}/{n} train_loss:{7 - s / 100:.4f} train_time:{10 * s}ms step_avg:10.0ms", flush=True)
    time.sleep(60)  # never reached: the wrapper ends the process after its window
""")


def test_profile_reference_runs_more_steps_under_the_profiler_and_times_only_the_first(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE_MUON)
    out = tmp_path / "ref_profile.json"
    r = B.run_ref(script, tmp_path, 786432, timeout=50, steps=15, profile=out)
    assert r["loss_curve"][-1][0] == 15 and r["steps_logged"] == 15  # the profiled 16-18 are not timed
    assert r["step_ms_steady"] == 10.0 and "profile" in r  # {} on a CPU: the summary counts GPU kernels
    assert __import__("json").loads(out.read_text())["profiled_steps"] == [16, 15 + B.PROFILED]
    assert r["timeline"][-1][0] < 50  # the wrapper ended the script after its window, not the timeout


def test_merge_joins_two_calls_halves_and_computes_their_ratio(tmp_path, monkeypatch):
    """The script's half in one call, pgolf's in the next on the same machine: one JSON whose
    ratio is pgolf's tokens/s over the script's; files from another GPU are refused by key."""
    import json

    head = {"what": "w", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6", "data": "/d",
            "steps": {"786432": 25}, "reference_stub": "/s", "ratio_tokens_per_second": {}}
    ref = {**head, "results": [{"program": "reference", "batch_tokens": 786432, "variant": None,
                                "tokens_per_second": 600_000}]}
    pg = {**head, "results": [{"program": "pgolf", "batch_tokens": 786432, "variant": "default",
                               "tokens_per_second": 660_000},
                              {"program": "pgolf", "batch_tokens": 786432, "variant": "--set a.b=1",
                               "tokens_per_second": 540_000}]}
    a, b, c, out = (tmp_path / n for n in ("a.json", "b.json", "c.json", "out.json"))
    a.write_text(json.dumps(ref))
    b.write_text(json.dumps(pg))
    monkeypatch.setattr(sys, "argv", ["x", "--merge", str(a), str(b), "--out", str(out), "--note", "GPU-1"])
    B.main()
    got = json.loads(out.read_text())
    assert got["ratio_tokens_per_second"] == {"786432": {"default": 1.1, "--set a.b=1": 0.9}}
    assert [r["program"] for r in got["results"]] == ["reference", "pgolf", "pgolf"]
    assert got["note"] == "GPU-1" and got["merged_from"] == ["a.json", "b.json"]
    c.write_text(json.dumps({**pg, "device": "NVIDIA H200"}))
    with pytest.raises(ValueError, match="differ in 'device'"):
        B.merge([a, c])
