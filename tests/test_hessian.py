"""Tests of pgolf.train.hessian on its own: the accumulator's per-row mean and the validation of the
result, the schedule's decisions (every N steps inside the start-scale window, the forced last
chance, the fallback, the window labels) over step/scale sequences against hand-written
expectations, and the overhead accounting from per-step times."""

from __future__ import annotations

import pytest
import torch

from pgolf.shared import train_files
from pgolf.train import hessian


def schedule(every: int, start_scale: float, iterations: int = 10, cap_s: float = 0.0):
    acc = hessian.HessianAccumulator({"a": 3}, device="cpu")
    return hessian.HessianSchedule(acc, every, start_scale, iterations, cap_s)


def drive(sched: hessian.HessianSchedule, scales: list[float], step_ms: float = 100.0) -> str:
    """Run the schedule over steps 0.. with these lr scales (each step `step_ms` long, a capture
    recorded whenever due): the labels it wrote, as one string."""
    for step, scale in enumerate(scales):
        captured = sched.due(step, scale, elapsed_ms=step * step_ms)
        if captured:
            sched.acc.record(4)
        sched.label(captured, scale)
    return "".join(sched.step_kind)


def test_accumulator_mean_over_rows_and_validation():
    torch.manual_seed(0)
    acc = hessian.HessianAccumulator({"a": 3}, device="cpu")
    x1, x2 = torch.randn(5, 3), torch.randn(7, 3)  # (rows, 3)
    for x in (x1, x2):
        acc.sums["a"] += x.T @ x
        acc.record(len(x))
    h, meta = acc.finalize()
    ref = (x1.T @ x1 + x2.T @ x2) / 12
    assert torch.allclose(h["a"], ref, atol=1e-6) and meta == {"rows": 12, "accumulations": 2, "world_size": 1}
    train_files.validate_hessians(h, {"a": 3})
    for bad, msg in ((torch.full((3, 3), float("nan")), "non-finite"), (torch.zeros(3, 3), "all-zero"),
                     (-torch.eye(3), "negative diagonal"), (torch.ones(2, 2), r"expected float32 \(3, 3\)")):
        with pytest.raises(hessian.HessianError, match=msg):
            train_files.validate_hessians({"a": bad}, {"a": 3})
    with pytest.raises(hessian.HessianError, match="missing Hessian"):
        train_files.validate_hessians({}, {"a": 3})
    with pytest.raises(hessian.HessianError, match="0 rows"):
        hessian.HessianAccumulator({"a": 3}, "cpu").finalize()


def test_due_every_n_steps_inside_the_window_only():
    s = schedule(every=2, start_scale=0.5)
    assert not s.due(2, 0.6, 0.0) and s.due(2, 0.4, 0.0) and not s.due(3, 0.4, 0.0)
    assert s.due(9, 0.9, 0.0)  # the last iteration with nothing captured yet: forced
    s.acc.record(1)
    assert not s.due(9, 0.9, 0.0)  # not once one was captured


@pytest.mark.parametrize("every,start_scale,scales,kinds", [
    # the window opens at step 4 (scale < 0.5): captures on its even steps, "w" between them
    (2, 0.5, [1.0, 1.0, 1.0, 1.0, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0], "nnnnhwhwhw"),
    # the window opens at step 5: its first capture is step 6, nothing forced at the end
    (2, 0.5, [1.0] * 5 + [0.4] * 5, "nnnnnwhwhw"),
    # start_scale > 1: the window is the whole run, every 3rd step from step 0
    (3, 1.1, [1.0] * 10, "hwwhwwhwwh"),
    # every 0: nothing scheduled, only the forced capture on the last iteration
    (0, 0.5, [1.0] * 6 + [0.4] * 4, "nnnnnnwwwh"),
    # a window with no scheduled step in it (every 7 > its length): forced at the end
    (7, 0.5, [1.0] * 8 + [0.4, 0.3], "nnnnnnnnwh"),
])
def test_schedule_decisions_over_step_scale_sequences(every, start_scale, scales, kinds):
    s = schedule(every, start_scale, iterations=len(scales))
    assert drive(s, scales) == kinds
    assert s.acc.accumulations == kinds.count("h") and not s.needs_fallback()


def test_last_chance_before_the_wallclock_cap():
    s = schedule(every=0, start_scale=0.5, iterations=1000, cap_s=1.0)
    # 100 ms steps: before step 6 (600 ms) the next step ends at 750 < 1000 ms; before step 7,
    # 700 + 1.5 * 100 = 850; before step 9, 900 + 150 >= 1000: the last chance.
    assert [s.last_chance(k, k * 100.0) for k in (0, 6, 7, 8, 9)] == [False, False, False, False, True]
    assert drive(s, [1.0] * 10) == "nnnnnnnnnh"
    assert not s.needs_fallback()


def test_fallback_when_no_step_captured():
    s = schedule(every=0, start_scale=0.5, iterations=100, cap_s=0.0)
    assert drive(s, [1.0] * 5) == "nnnnn"  # stopped before the last iteration (a test, a crash)
    assert s.needs_fallback()
    s.acc.record(8)
    assert not s.needs_fallback()


def test_hessian_overhead_from_step_times():
    ms = [900.0, 100, 101, 99, 130, 100, 5000, 102, 128, 100]  # a slow first step and one stall
    kinds = ["n", "n", "w", "w", "h", "w", "w", "w", "h", "w"]
    o = hessian.hessian_overhead(ms, kinds, every=5)
    # median h = (128 + 130)/2 = 129, median w of 99,100,100,101,102,5000 = 100.5: 28.5 ms / 5 steps / 100.5 ms
    assert o == {"hessian_step_ms": 129.0, "normal_step_ms": 100.5,
                 "hessian_overhead_pct": round(100 * 28.5 / 5 / 100.5, 3)}
    assert hessian.hessian_overhead(ms, ["n"] * 10, 5)["hessian_overhead_pct"] is None
    no_window = hessian.hessian_overhead([900.0, 100, 100, 150], ["n", "n", "n", "h"], every=0)  # forced one only
    assert no_window["normal_step_ms"] == 100 and no_window["hessian_overhead_pct"] == round(100 * 50 / 4 / 100, 3)
    s = schedule(every=5, start_scale=1.1)
    s.step_kind = kinds
    assert s.overhead(ms) == o


def test_one_validator_for_the_file_allows_only_the_optional_extras_given():
    """train checks its Hessians with no extras; quantize allows one for any other 2-D weight
    (which then gets full GPTQ), of that weight's input width."""
    good = torch.eye(3)
    train_files.validate_hessians({"a": good, "b": torch.eye(2)}, {"a": 3}, optional={"b": 2})
    with pytest.raises(hessian.HessianError, match="Hessian for unknown matrix 'b'"):
        train_files.validate_hessians({"a": good, "b": torch.eye(2)}, {"a": 3})
    with pytest.raises(hessian.HessianError, match=r"x.pgt: b is torch.float32 \(2, 2\), expected float32 \(4, 4\)"):
        train_files.validate_hessians({"a": good, "b": torch.eye(2)}, {"a": 3}, "x.pgt", optional={"b": 4})


def test_head_hessian_is_the_gram_of_the_final_norm_output():
    """train.hessian_head (GPT.head_hessian): hessian_shapes gains the tied head, "tok_emb.weight" ->
    model_dim, and a capture adds X^T X of forward_hidden's output (the rows the head multiplies)
    there, leaving every block matrix's Gram as without it; off, the dict has no such entry."""
    from conftest import tiny_model
    from pgolf.shared.model import HEAD_HESSIAN

    model = tiny_model(5)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = model.zero_hessians()
    assert HEAD_HESSIAN not in plain and HEAD_HESSIAN not in model.hessian_shapes()
    model.head_hessian = True
    assert model.hessian_shapes()[HEAD_HESSIAN] == model.cfg.model_dim
    sums = model.zero_hessians()
    with torch.no_grad():
        hidden = model.forward_hidden(idx, sums)  # (2, 16, D)
        model.forward_hidden(idx, plain)
    x = hidden.reshape(-1, hidden.shape[-1]).double()
    assert torch.allclose(sums[HEAD_HESSIAN].double(), x.T @ x, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(sums[n], plain[n]) for n in plain)
    train_files.validate_hessians(sums, model.hessian_shapes(), "head")
