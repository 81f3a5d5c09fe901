"""Tests of pgolf.train.triggers and pgolf.train.priming on their own, without a training run:
each trigger's step and log line, the resumed start steps, the graphs compile priming runs, and
a priming pass restoring the weights and optimizer state (whole runs: test_train.py)."""

from __future__ import annotations

import torch

from pgolf.shared.model import GPT
from pgolf.train import priming
from pgolf.train.triggers import Triggers
from test_train import mcfg, tcfg


def _triggers(tmp_path, m=None, **kw) -> tuple[Triggers, GPT, list[str]]:
    lines: list[str] = []
    model = GPT(m or mcfg(), train_seq_len=128)
    return Triggers(model, tcfg(tmp_path, **kw), lines.append), model, lines


def test_late_qat_starts_once_below_the_threshold(tmp_path):
    tr, model, lines = _triggers(tmp_path, late_qat_threshold=0.35)
    for step, scale in enumerate([1.0, 0.5, 0.3, 0.2, 0.1]):
        tr.before_step(step, scale, 0.0)
    assert model.qat_on and tr.qat_start_step == 2
    assert lines == ["late_qat: enabled at step 2 (lr scale 0.3000)"]
    off, model, lines = _triggers(tmp_path, late_qat_threshold=0.0)
    off.before_step(0, 0.0, 0.0)
    assert not model.qat_on and off.metrics() == {"qat_start_step": None, "loop_start_step": None} and not lines


def test_depth_recurrence_starts_at_its_fraction(tmp_path):
    m = mcfg(num_loops=1, loop_start=0, loop_end=0)
    tr, model, lines = _triggers(tmp_path, m=m, iterations=10, loop_enable_frac=0.5)
    assert not model.looping and tr.loop_start_step is None
    on = []
    for step in range(10):
        tr.before_step(step, 1.0, 0.0)
        on.append(model.looping)
    assert on == [False] * 5 + [True] * 5 and tr.loop_start_step == 5
    assert lines == ["depth_recurrence: enabled at step 5 (frac 0.500), layers [0, 0, 1]"]
    always, model, _ = _triggers(tmp_path, m=m, loop_enable_frac=0.0)
    assert model.looping and always.loop_start_step == 0  # on from the start


def test_seq_len_follows_the_schedule_and_logs_changes(tmp_path):
    tr, _, lines = _triggers(tmp_path, iterations=8, seq_len_schedule=((32, 0.25), (64, 0.5)))
    assert tr.seq_len == 32
    seen = []
    for step in range(8):
        tr.before_step(step, 1.0, 0.0)
        seen.append(tr.seq_len)
    assert seen == [32, 32, 64, 64, 128, 128, 128, 128]
    assert lines == ["seq_len: 64 from step 2", "seq_len: 128 from step 4"]


def test_resumed_start_steps_are_reported(tmp_path):
    tr, _, _ = _triggers(tmp_path)
    tr.resume(15, 3)
    assert tr.metrics() == {"qat_start_step": 15, "loop_start_step": 3}


def test_priming_graphs_cover_every_length_and_the_later_loop():
    looped_later = GPT(mcfg(num_loops=1, loop_start=0, loop_end=0), train_seq_len=128)
    looped_later.set_looping(False)
    assert priming.graphs(looped_later, [128, 32, 64, 32]) == [
        (False, 32), (False, 64), (False, 128), (True, 32), (True, 64), (True, 128)]
    plain = GPT(mcfg(), train_seq_len=128)
    assert priming.graphs(plain, [128]) == [(False, 128)]


def test_primer_restores_weights_and_optimizer_state(tmp_path):
    """Priming steps change the weights and the optimizer state; afterwards both are as before,
    and each graph ran two steps (nothing compiles on the CPU), the second with the Hessian buffers."""
    from pgolf.shared import dist
    from pgolf.train.optim import build_optimizers

    cfg = tcfg(tmp_path, seq_len_schedule=((64, 0.5),))
    model = GPT(mcfg(), train_seq_len=128)
    opt = build_optimizers(model.optimizer_groups(), cfg, dist.init("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def run_step(seq_len, hessians):
        calls.append((seq_len, hessians is not None))
        x = torch.randint(0, 1024, (2, seq_len))
        model(x, torch.roll(x, -1, 1)).backward()
        opt.step(1.0, cfg.muon_momentum)
        opt.zero_grad(set_to_none=True)

    lines = []
    done = priming.Primer(model, run_step, dist.init("cpu"), lines.append).prime(opt, 3, cfg.seq_lens())
    assert calls == [(64, False), (64, True), (128, False), (128, True)]
    assert len(done.step_seconds) == 4 and done.metrics()["warmup_steps_run"] == 4
    assert lines[-1].startswith("warmup: 4 compile-priming steps in ")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(not state["state"] for state in opt.state_dict().values())  # fresh again: no moments
