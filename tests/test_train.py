"""Tests of pgolf.train.train / stages.train at a micro config on real FineWeb tokens (the 20k-token
fixture): schedule numbers against hand computations, loss going down, outputs and metric keys,
bit-exact resume after a crash, warmup restore, late QAT, SWA, Hessians against a hand X^T X,
bad inputs, and the 2-process gloo path (both ranks identical, = 1 process). pgolf.train.checkpoint
and pgolf.train.hessian on their own: test_checkpoint.py, test_hessian.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

from pgolf import config
from pgolf.shared import tensorfile, train_files
from pgolf.train import checkpoint, priming, schedule
from pgolf.train import train as T
from pgolf.config import ConfigError, ModelConfig, TrainConfig
from pgolf.train.loader import DistributedTokenLoader
from pgolf.shared.shards import ShardError, read_shard, write_shard
from pgolf.shared.model import GPT
from pgolf.train.timing import StepTimer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fineweb_val_prefix20k.bin"
TOKENIZER = ROOT / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"

MICRO_MODEL = {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "xsa_last_n": 2,
               "bigram_buckets": 64, "bigram_dim": 16, "ve_dim": 16, "ve_last_n": 1, "rope_dims": 8}
MICRO_TRAIN = {"device": "cpu", "batch_tokens": 2048, "seq_len": 128, "iterations": 24, "warmdown_iters": 8,
               "muon_momentum_warmup_steps": 8, "hessian_every": 4, "val_tokens": 2048, "val_batch_seqs": 8,
               "log_every": 8, "checkpoint_every": 0, "warmup_steps": 0, "grad_accum_steps": 1,
               "max_wallclock_seconds": 0.0}


# ----------------------------------------------------------------------------- fixtures


def _write_data(root: Path) -> None:
    from pgolf.shared.shards import read_shard
    from pgolf.prepare.tokenizer import build_byte_tables, file_sha256, load_tokenizer

    toks = read_shard(FIXTURE)  # 20,000 official val tokens
    write_shard(root / "shards" / "fineweb_train_000000.bin", toks[:10000])
    write_shard(root / "shards" / "fineweb_train_000001.bin", toks[10000:16000])
    write_shard(root / "shards" / "fineweb_val_000000.bin", toks[16000:])
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text(json.dumps(
        {"model_file": "tokenizer.model", "vocab_size": 1024, "sha256": file_sha256(TOKENIZER), "source": "test"}))
    build_byte_tables(load_tokenizer(TOKENIZER, 1024), 1024).save(tok / "byte_tables.pgt")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _write_data(root)
    return root


def mcfg(**kw) -> ModelConfig:
    base = config.load("model", ROOT / "params.yaml")
    return dataclasses.replace(base, **{**MICRO_MODEL, **kw})


def tcfg(tmp: Path, **kw) -> TrainConfig:
    base = config.load("train", ROOT / "params.yaml")
    return dataclasses.replace(base, **{**MICRO_TRAIN, "checkpoint_dir": str(tmp / "ckpt"), **kw})


def paths(data_root: Path, out: Path) -> T.Paths:
    return T.Paths(shards=data_root / "shards", tokenizer=data_root / "tokenizer", out_dir=out / "artifacts" / "train",
                   metrics=out / "metrics" / "train.json", plots=out / "plots" / "train.tsv")


def run(data_root, tmp, m=None, on_step=None, **kw) -> T.TrainResult:
    return T.run(m or mcfg(), tcfg(tmp, **kw), paths(data_root, tmp), on_step=on_step)


# ----------------------------------------------------------------------------- schedule


def test_lr_scale_step_based_matches_hand_numbers(tmp_path):
    cfg = tcfg(tmp_path, iterations=10, warmdown_iters=4, max_wallclock_seconds=0.0)
    got = [schedule.lr_scale(s, 1e9, cfg) for s in range(10)]  # elapsed time is ignored without a cap
    assert got == [1.0] * 7 + [0.75, 0.5, 0.25]
    assert schedule.lr_scale(3, 0.0, dataclasses.replace(cfg, warmdown_iters=0)) == 1.0
    assert schedule.lr_scale(0, 0.0, dataclasses.replace(cfg, warmdown_iters=20)) == 0.5  # longer than the run


def test_lr_scale_wallclock_matches_hand_numbers(tmp_path):
    cfg = tcfg(tmp_path, max_wallclock_seconds=10.0, warmdown_iters=100)
    # (step, elapsed ms) -> step_ms = e/s, W = 100*step_ms, R = 10000 - e, scale = R/W if R <= W
    assert schedule.lr_scale(0, 0.0, cfg) == 1.0
    assert schedule.lr_scale(100, 1000.0, cfg) == 1.0  # W = 1000, R = 9000
    assert schedule.lr_scale(10, 1000.0, cfg) == pytest.approx(0.9)  # W = 10000, R = 9000
    assert schedule.lr_scale(50, 4000.0, cfg) == pytest.approx(0.75)  # W = 8000, R = 6000
    assert schedule.lr_scale(80, 8000.0, cfg) == pytest.approx(0.2)  # W = 10000, R = 2000
    assert schedule.lr_scale(100, 10000.0, cfg) == 0.0
    assert schedule.lr_scale(120, 12000.0, cfg) == 0.0  # past the cap


def test_warmdown_frac_matches_the_pr2135_rule_by_hand(tmp_path):
    """train.warmdown_frac f: scale = (1 - frac) / f once frac >= 1 - f, else 1 (PR #2135's lr_mul),
    frac wallclock-based with a cap, step-based without one; it takes over from warmdown_iters."""
    cfg = tcfg(tmp_path, warmdown_frac=0.8, max_wallclock_seconds=10.0, warmdown_iters=100)
    got = [schedule.lr_scale(0, ms, cfg) for ms in (0.0, 1000.0, 2000.0, 4000.0, 6000.0, 9000.0, 10000.0, 12000.0)]
    want = [1.0, 1.0, 1.0, 0.75, 0.5, 0.125, 0.0, 0.0]  # frac 0, .1, .2 (the start), .4, .6, .9, 1, past the cap
    assert got == pytest.approx(want, abs=1e-12)
    steps = tcfg(tmp_path, warmdown_frac=0.5, max_wallclock_seconds=0.0, iterations=10)
    assert [schedule.lr_scale(s, 1e9, steps) for s in range(10)] == pytest.approx([1.0] * 6 + [0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ConfigError, match=r"train.warmdown_frac must be in \[0, 1\], got 1.5"):
        config.check(tcfg(tmp_path, warmdown_frac=1.5))


def test_min_lr_floors_the_lr_multiplier_only(tmp_path):
    cfg = tcfg(tmp_path, iterations=10, warmdown_iters=4, max_wallclock_seconds=0.0, min_lr=0.4)
    scales = [schedule.lr_scale(s, 0.0, cfg) for s in range(10)]
    assert scales == [1.0] * 7 + [0.75, 0.5, 0.25]  # the schedule itself is unchanged
    assert [schedule.lr_multiplier(v, cfg) for v in scales] == [1.0] * 7 + [0.75, 0.5, 0.4]
    zero = dataclasses.replace(cfg, min_lr=0.0)
    assert [schedule.lr_multiplier(v, zero) for v in scales] == scales  # the default: today's schedule


def test_min_lr_reaches_the_optimizers_and_late_qat_still_reads_the_scale(data_root, tmp_path):
    lrs = {}

    def watch(tr):
        lrs[tr.step] = tr.opt.muon.param_groups[0]["lr"]

    # scale = (12 - s)/8 for s >= 4; floored at 0.5 -> lr 0.025 * [1]*4 + [1, .875, .75, .625, .5, .5, .5, .5]
    r = run(data_root, tmp_path, on_step=watch, iterations=12, warmdown_iters=8, late_qat_threshold=0.3, min_lr=0.5)
    want = [1.0] * 5 + [0.875, 0.75, 0.625, 0.5, 0.5, 0.5, 0.5]
    assert [lrs[s] for s in range(1, 13)] == pytest.approx([0.025 * w for w in want])
    assert r.metrics["qat_start_step"] == 10  # 2/8 < 0.3 although the lr stays at 0.5


def test_training_frac_steps_or_wallclock(tmp_path):
    steps = tcfg(tmp_path, iterations=20, max_wallclock_seconds=0.0)
    assert [schedule.training_frac(s, 1e9, steps) for s in (0, 7, 20)] == [0.0, 0.35, 1.0]
    clock = tcfg(tmp_path, iterations=20, max_wallclock_seconds=10.0)
    assert schedule.training_frac(19, 3500.0, clock) == 0.35  # the step count is ignored under a cap


def test_depth_recurrence_switches_on_at_its_fraction(data_root, tmp_path):
    seen = {}
    m = mcfg(num_loops=1, loop_start=0, loop_end=0)  # 2 layers: order 0 0 1 once on
    r = run(data_root, tmp_path, m=m, on_step=lambda tr: seen.update({tr.step: tr.model.looping}),
            iterations=12, loop_enable_frac=0.5, warmup_steps=1)
    assert [seen[s] for s in range(1, 13)] == [False] * 6 + [True] * 6  # on from step 6 = 0.5 * 12
    assert r.metrics["loop_start_step"] == 6
    assert "depth_recurrence: enabled at step 6 (frac 0.500), layers [0, 0, 1]" in r.log_text
    model = GPT(m, train_seq_len=128)
    model.load_export_state_dict(r.export)
    assert model.looping  # exported and evaluated with the loop, as the evaluate stage rebuilds it


def test_seq_len_schedule_lookup(tmp_path):
    cfg = tcfg(tmp_path, seq_len=128, seq_len_schedule=((32, 0.25), (64, 0.5)))
    assert [schedule.seq_len_at(f, cfg) for f in (0.0, 0.2499, 0.25, 0.4999, 0.5, 1.0)] == [32, 32, 64, 64, 128, 128]
    assert schedule.seq_len_at(0.0, tcfg(tmp_path)) == 128  # no schedule


def test_seq_len_schedule_drives_the_batches(data_root, tmp_path):
    seen = {}

    def watch(tr):
        seen[tr.step] = tr.triggers.seq_len

    r = run(data_root, tmp_path, on_step=watch, iterations=12, seq_len_schedule=((32, 0.25), (64, 0.5)),
            warmup_steps=1)
    assert [seen[s] for s in range(1, 13)] == [32] * 3 + [64] * 3 + [128] * 6  # same 2048 tokens per step
    assert "seq_len: 64 from step 3" in r.log_text and "seq_len: 128 from step 6" in r.log_text
    assert r.metrics["seq_len"] == 128


def test_muon_momentum_ramp(tmp_path):
    cfg = tcfg(tmp_path, muon_momentum_warmup_start=0.92, muon_momentum=0.99, muon_momentum_warmup_steps=50)
    assert schedule.muon_momentum_at(0, cfg) == pytest.approx(0.92)
    assert schedule.muon_momentum_at(25, cfg) == pytest.approx(0.955)
    assert schedule.muon_momentum_at(50, cfg) == pytest.approx(0.99)
    assert schedule.muon_momentum_at(500, cfg) == pytest.approx(0.99)
    assert schedule.muon_momentum_at(0, dataclasses.replace(cfg, muon_momentum_warmup_steps=0)) == pytest.approx(0.99)


def test_a_step_gradient_is_the_mean_gradient_over_its_micro_batches(data_root, tmp_path):
    """With grad_accum_steps k a step hands its optimizers the gradient of the mean loss over the
    step's k micro-batches, i.e. what one micro-batch holding all of them gives, so fewer, larger
    micro-batches (train.grad_accum_steps on one GPU) compute the same step to fp32 summation order.
    (They do not see byte-identical sequences: the challenge loader takes each micro-batch's span
    plus one target token, so boundaries shift by a token per micro-batch.)"""
    from pgolf.shared import dist

    cfg = tcfg(tmp_path, grad_accum_steps=4, iterations=1, hessian_every=0, grad_clip=0.0)  # the raw gradient
    pth = paths(data_root, tmp_path)
    tr = T.Trainer(mcfg(), cfg, pth, dist.init("cpu"), T.check_inputs(pth, mcfg(), cfg))
    start = tr.loader.state_dict()
    grads = {}
    tr.opt.step = lambda *a, **k: grads.update({n: p.grad.clone() for n, p in tr.model.named_parameters()})
    loss = float(tr._step(1, 1.0, cfg.seq_len, None, ema=False))  # 4 micro-batches of 4 x 128
    tr.loader.load_state_dict(start)
    micro = [tr.loader.next_batch(cfg.batch_tokens // 4, cfg.seq_len) for _ in range(4)]
    x, y = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])  # (16, 128) each
    tr.model.zero_grad(set_to_none=True)
    whole = tr.fwd(x, y)  # one micro-batch of 16 x 128, same weights
    whole.backward()
    assert float(whole.detach()) == pytest.approx(loss, rel=1e-6)
    assert sum(float(g.abs().max()) > 0 for g in grads.values()) > 5
    for name, p in tr.model.named_parameters():
        g = grads[name]
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_step_timer_on_cpu_times_each_step_and_reloads():
    timer = StepTimer(cuda=False)
    for _ in range(3):
        timer.start()
        sum(range(20000))
        timer.stop()
    assert len(timer.ms) == 3 and all(t > 0 for t in timer.ms)
    timer.load([1.0, 2.0])
    timer.start()
    timer.stop()
    assert timer.ms[:2] == [1.0, 2.0] and len(timer.ms) == 3


# ----------------------------------------------------------------------------- a whole run


def test_run_learns_and_writes_contract_outputs(data_root, tmp_path):
    r = run(data_root, tmp_path, iterations=40, warmdown_iters=10, log_every=10)
    losses = [row["train_loss"] for row in r.rows]
    assert [row["step"] for row in r.rows] == [1, 10, 20, 30, 40]
    assert losses[0] == pytest.approx(math.log(1024), abs=0.05)  # near-uniform at init
    assert losses[-1] < losses[0] - 1.0, losses
    p = paths(data_root, tmp_path)
    out = Path(p.out_dir)
    assert sorted(f.name for f in out.iterdir()) == ["hessians.pgt", "model.pgt", "train.log"]

    weights, header = tensorfile.load(out / "model.pgt", kind="float_weights")
    meta = header["meta"]
    assert meta["model"] == dataclasses.asdict(mcfg()) and meta["train_seq_len"] == 128
    assert meta["qat_bits"] == 6 and meta["qat_quantile"] == 0.9995
    assert meta["tokenizer"]["vocab_size"] == 1024 and len(meta["tokenizer"]["sha256"]) == 64
    model = GPT(ModelConfig(**meta["model"]), train_seq_len=meta["train_seq_len"])
    model.load_export_state_dict(weights)
    assert all(t.dtype == torch.float32 for t in weights.values())
    for name, t in r.export.items():
        assert torch.equal(weights[name], t)

    hs, hmeta = train_files.load_hessians(out / "hessians.pgt")
    shapes = model.hessian_shapes()
    assert sorted(hs) == sorted(model.quantizable_names())
    assert all(tuple(hs[n].shape) == (k, k) for n, k in shapes.items())
    train_files.validate_hessians(hs, shapes)
    assert hmeta["world_size"] == 1 and hmeta["rows"] == 2048 * hmeta["accumulations"]
    assert hmeta["accumulations"] == len([s for s in range(40) if s > 30 and s % 4 == 0])  # scale < 1 from 31

    m = json.loads(Path(p.metrics).read_text())
    for key in ("steps", "train_seconds", "tokens_per_second", "world_size", "val_bpb_float", "peak_memory_mb",
                "val_loss_float", "hessian_overhead_pct", "qat_start_step", "swa_snapshots", "grad_accum_steps",
                "batch_tokens", "config", "versions", "device"):
        assert key in m, key
    assert m["steps"] == 40 and m["world_size"] == 1 and m["grad_accum_steps"] == 1 and m["batch_tokens"] == 2048
    assert 0 < m["val_bpb_float"] < 5 and m["val_loss_float"] > 0
    assert m["val_bpb_float"] == pytest.approx(m["val_loss_float"] * m["val_tokens_scored"] / math.log(2)
                                               / _val_bytes(data_root, 2048, 128), rel=1e-9)
    assert m["config"]["train"]["iterations"] == 40 and set(m["versions"]) == {"torch", "triton", "python"}
    assert m["qat_start_step"] == 39  # scale (40-s)/10 < 0.15 from s = 39
    assert m["hessian_overhead_pct"] is not None
    tsv = Path(p.plots).read_text().splitlines()
    assert tsv[0] == "step\ttrain_loss\tlr_scale\ttokens_per_second" and len(tsv) == 6
    log = (out / "train.log").read_text()
    assert "step:10/40" in log and "eta:" in log and "late_qat: enabled at step 39" in log and "val_bpb_float" in log


def _val_bytes(data_root: Path, val_tokens: int, seq_len: int) -> int:
    from pgolf.shared.byte_tables import load_byte_tables
    from pgolf.shared.shards import read_shard

    toks = read_shard(data_root / "shards" / "fineweb_val_000000.bin")[:val_tokens + 1]
    n = (len(toks) - 1) // seq_len * seq_len + 1
    return load_byte_tables(data_root / "tokenizer").stream_bytes(toks[:n])


# ----------------------------------------------------------------------------- resume


class Crash(RuntimeError):
    pass


RESUME_KW = dict(iterations=20, warmdown_iters=16, checkpoint_every=4, hessian_every=3, hessian_start_scale=1.0,
                 swa_enabled=True, swa_every=2, swa_threshold=0.7, late_qat_threshold=0.35, log_every=5)


def test_val_live_scores_the_live_weights_beside_the_exported_ema(data_root, tmp_path):
    from pgolf.shared import bpb

    seen = {}

    def on_step(tr):
        if tr.step == 24:  # the last step: these are the live weights finish() scores first
            tr.model.set_qat(False)
            seen.update(bpb.eval_nonsliding(tr.model, tr.inputs.val_tokens, tr.inputs.tables, 128, 8, "cpu"))

    m = run(data_root, tmp_path / "on", on_step=on_step, val_live=True, ema_decay=0.9).metrics
    assert m["exported_weights"] == "ema"
    assert (m["val_bpb_live"], m["val_loss_live"]) == pytest.approx((seen["val_bpb"], seen["val_loss"]), rel=1e-9)
    assert abs(m["val_bpb_live"] - m["val_bpb_float"]) > 1e-4  # the EMA is another model
    assert "val_bpb_live" not in run(data_root, tmp_path / "off", ema_decay=0.9).metrics  # off by default


def test_killed_run_resumes_to_identical_weights(data_root, tmp_path):
    a = run(data_root, tmp_path / "a", **RESUME_KW)

    def crash_at_17(tr):
        if tr.step == 17:
            raise Crash("simulated kill")

    b_dir = tmp_path / "b"
    with pytest.raises(Crash):
        run(data_root, b_dir, on_step=crash_at_17, **RESUME_KW)
    ckpt = b_dir / "ckpt" / checkpoint.CHECKPOINT_FILE
    assert ckpt.is_file() and not (b_dir / "artifacts").exists()  # killed: no outputs, a checkpoint at 16
    _, header = tensorfile.load(ckpt, kind=checkpoint.CHECKPOINT_KIND)
    st = header["meta"]
    assert st["step"] == 16 and st["qat_on"] and st["swa_count"] == 4 and st["hessian"]["accumulations"] == 4

    b = run(data_root, b_dir, **RESUME_KW)
    assert b.metrics["resumed_from_step"] == 16 and b.metrics["checkpoint"] == "resumed"
    assert not ckpt.exists()  # deleted after success
    assert set(a.export) == set(b.export)
    for n in a.export:
        assert torch.equal(a.export[n], b.export[n]), n
    for n in a.hessians:
        assert torch.equal(a.hessians[n], b.hessians[n]), n
    assert a.hessian_meta == b.hessian_meta
    for k in ("steps", "qat_start_step", "swa_snapshots", "hessian_accumulations", "exported_weights"):
        assert a.metrics[k] == b.metrics[k], k
    assert a.metrics["qat_start_step"] == 15 and a.metrics["swa_snapshots"] == 6
    assert [r["train_loss"] for r in a.rows] == [r["train_loss"] for r in b.rows]
    assert "resume: from" in b.log_text and "step:15/20" in b.log_text  # log kept across the restart


def test_killed_looped_run_resumes_with_the_loop_on(data_root, tmp_path):
    m = mcfg(num_loops=1, loop_start=1, loop_end=1)
    kw = dict(iterations=12, checkpoint_every=4, loop_enable_frac=0.25)  # loops from step 3
    a = run(data_root, tmp_path / "a", m=m, **kw)

    def crash_at_9(tr):
        if tr.step == 9:
            raise Crash()

    with pytest.raises(Crash):
        run(data_root, tmp_path / "b", m=m, on_step=crash_at_9, **kw)
    b = run(data_root, tmp_path / "b", m=m, **kw)
    assert b.metrics["resumed_from_step"] == 8 and a.metrics["loop_start_step"] == b.metrics["loop_start_step"] == 3
    for n in a.export:
        assert torch.equal(a.export[n], b.export[n]), n


def test_mismatched_or_corrupt_checkpoint_starts_fresh(data_root, tmp_path):
    kw = dict(iterations=10, checkpoint_every=4)

    def crash_at_5(tr):
        if tr.step == 5:
            raise Crash()

    with pytest.raises(Crash):
        run(data_root, tmp_path, on_step=crash_at_5, **kw)
    ckpt = tmp_path / "ckpt" / checkpoint.CHECKPOINT_FILE
    assert ckpt.is_file()
    r = run(data_root, tmp_path, **{**kw, "matrix_lr": 0.02})  # another config: not resumed
    assert r.metrics["resumed_from_step"] == 0
    why = r.metrics["checkpoint"]
    assert "another configuration" in why and "train.matrix_lr: 0.025 -> 0.02" in why
    assert "starting fresh" in r.log_text

    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"PGOLFTF\x00garbage")
    r2 = run(data_root, tmp_path, **kw)
    assert r2.metrics["resumed_from_step"] == 0 and r2.metrics["checkpoint"].startswith("checkpoint unreadable")
    assert not ckpt.exists()
    fresh = run(data_root, tmp_path / "fresh", **kw)
    assert all(torch.equal(fresh.export[n], r2.export[n]) for n in fresh.export)


def test_warmup_steps_restore_the_initial_state(data_root, tmp_path):
    a = run(data_root, tmp_path / "a", iterations=6, warmup_steps=0)
    b = run(data_root, tmp_path / "b", iterations=6, warmup_steps=3)
    # eager on the CPU: nothing compiles, so priming stops after its second step (the capture)
    assert b.metrics["warmup_seconds"] > 0 and "warmup: 2 compile-priming steps" in b.log_text
    assert (a.metrics["warmup_steps_run"], b.metrics["warmup_steps_run"]) == (0, 2)
    for n in a.export:
        assert torch.equal(a.export[n], b.export[n]), n


def _fake_compiles(monkeypatch, loud_steps: int) -> None:
    """compiles_so_far as if each of the first `loud_steps` priming steps built a graph
    (it is read once before and once after every step)."""
    reads = iter(range(10_000))
    state = {"count": 0}

    def fake() -> int:
        i = next(reads)
        if i % 2 == 1 and i // 2 < loud_steps:  # the read after a loud step
            state["count"] += 1
        return state["count"]
    monkeypatch.setattr(priming, "compiles_so_far", fake)


@pytest.mark.parametrize("loud, cap, want", [(3, 10, 4), (0, 10, 2), (12, 5, 5), (5, 1, 1)])
def test_priming_stops_after_a_step_that_compiles_nothing(data_root, tmp_path, monkeypatch, loud, cap, want):
    _fake_compiles(monkeypatch, loud)
    r = run(data_root, tmp_path, iterations=2, warmup_steps=cap)
    assert r.metrics["warmup_steps_run"] == want == len(r.metrics["warmup_step_seconds"])
    assert f"warmup: {want} compile-priming steps" in r.log_text
    built = ", ".join(str(int(i < loud)) for i in range(want))  # what each step compiled, in the log
    assert re.search(rf"warmup: seq_len 128: step seconds [\d., ]+; graphs built {built}\n", r.log_text)


def test_priming_counts_each_graph(data_root, tmp_path, monkeypatch):
    _fake_compiles(monkeypatch, 3)  # the first graph needs 4 steps, the next ones 2
    r = run(data_root, tmp_path, iterations=4, warmup_steps=10, seq_len_schedule=((32, 0.25), (64, 0.5)))
    assert r.metrics["warmup_steps_run"] == 4 + 2 + 2  # lengths 32, 64, 128


def test_compiles_so_far_counts_forward_and_backward_graphs():
    lin = torch.nn.Linear(8, 4)
    fn = torch.compile(lambda x: F.gelu(lin(x)).sum(), dynamic=False, fullgraph=True)
    x = torch.randn(3, 8)
    before = priming.compiles_so_far()
    loss = fn(x)
    after_fwd = priming.compiles_so_far()
    loss.backward()
    after_bwd = priming.compiles_so_far()
    fn(x).backward()  # built: a second call compiles nothing
    # the backward graph is built in the first backward, or with the forward when AOTAutograd's
    # on-disk cache holds the pair from an earlier process
    assert before + 1 < after_bwd == priming.compiles_so_far() and before < after_fwd


def test_warm_compile_reuses_aot_autograd_cache_with_the_fused_mlp(tmp_path, monkeypatch):
    """The fused MLP's autograd.Function made AOTAutograd's on-disk cache bypass the graph (a warm
    rerun traced forward+backward again); after compile_forward's setting, a second compile of the
    same graph in a fresh dynamo state is a cache hit, and the kernels still give the same values."""
    from torch._dynamo.utils import counters
    import torch._functorch.config as functorch_config
    from pgolf.shared.kernels import fused_mlp as fm

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(functorch_config, "autograd_cache_allow_custom_autograd_functions", False)
    gen = torch.Generator().manual_seed(3)
    x, w_up, w_down = (torch.randn(*s, generator=gen) * 0.3 for s in ((32, 16), (48, 16), (16, 48)))
    want = fm.eager_mlp(x, w_up, w_down)

    def compiled_once() -> dict:
        torch._dynamo.reset()
        counters["aot_autograd"].clear()
        fn = torch.compile(lambda a, b, c: fm.fused_leaky_relu_sq_mlp(a, b, c, 0.5), fullgraph=True)
        leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
        out = fn(*leaves)
        out.sum().backward()
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
        return dict(counters["aot_autograd"])

    assert compiled_once().get("autograd_cache_bypass") == 1  # torch's default: no cache
    priming.compile_forward(GPT(mcfg(), train_seq_len=128), "model", backend="aot_eager")  # sets it
    first, second = compiled_once(), compiled_once()
    assert first.get("autograd_cache_miss") == 1 and first.get("autograd_cache_saved") == 1
    assert second.get("autograd_cache_hit") == 1 and "autograd_cache_bypass" not in second


# ----------------------------------------------------------------------------- QAT, SWA, Hessians


def test_late_qat_switches_on_at_threshold_and_changes_training(data_root, tmp_path):
    seen = {}

    def watch(tr):
        weights = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        seen[tr.step] = (tr.model.qat_on, weights)

    # scale = (12 - s)/8 for s >= 4: < 0.5 first at s = 9
    q = run(data_root, tmp_path / "q", on_step=watch, iterations=12, warmdown_iters=8, late_qat_threshold=0.5)
    assert q.metrics["qat_start_step"] == 9 and "late_qat: enabled at step 9 (lr scale 0.3750)" in q.log_text
    assert [seen[s][0] for s in range(1, 13)] == [False] * 9 + [True] * 3
    qat_weights = {s: w for s, (_, w) in seen.items()}
    seen.clear()
    p = run(data_root, tmp_path / "p", on_step=watch, iterations=12, warmdown_iters=8, late_qat_threshold=0.0)
    assert p.metrics["qat_start_step"] is None
    for n in qat_weights[9]:  # bit-identical to the run without QAT until QAT starts
        assert torch.equal(qat_weights[9][n], seen[9][1][n])
    assert any(not torch.equal(qat_weights[12][n], seen[12][1][n]) for n in qat_weights[12])
    model = GPT(mcfg(), train_seq_len=128)
    model.load_export_state_dict(q.export)
    x = torch.randint(0, 1024, (2, 128))
    with torch.no_grad():
        plain = model.forward_logits(x)
        model.set_qat(True)
        with model.qat_weights():
            fake = model.forward_logits(x)
    assert not torch.allclose(plain, fake)


def test_swa_exports_the_mean_of_the_snapshots(data_root, tmp_path):
    snaps, ema_last = [], {}

    def watch(tr):
        if tr.avg.swa_count > len(snaps):
            snaps.append({n: p.detach().clone() for n, p in tr.model.named_parameters()})
        ema_last.update({n: e.clone() for n, e in zip(tr.avg.names, tr.avg.ema)})

    kw = dict(iterations=16, warmdown_iters=10, swa_enabled=True, swa_every=3, swa_threshold=0.6)
    r = run(data_root, tmp_path, on_step=watch, **kw)
    # scale (16 - s)/10 < 0.6 for s >= 11; snapshot after step s when (s + 1) % 3 == 0: 12, 15
    assert r.metrics["swa_snapshots"] == 2 == len(snaps) and r.metrics["swa_start_step"] == 12
    assert r.metrics["exported_weights"] == "swa" and "swa: first snapshot at step 12" in r.log_text
    model = GPT(mcfg(), train_seq_len=128)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((snaps[0][n] + snaps[1][n]) / 2)
    ref = model.export_state_dict()
    for n in ref:
        assert torch.allclose(r.export[n], ref[n], atol=1e-7, rtol=0), n
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ema_last[n])
    ema_export = model.export_state_dict()
    assert any(not torch.allclose(r.export[n], ema_export[n]) for n in ref)
    off = run(data_root, tmp_path / "off", **{**kw, "swa_enabled": False})
    assert off.metrics["swa_snapshots"] == 0 and off.metrics["exported_weights"] == "ema"
    for n in ema_export:
        assert torch.equal(off.export[n], ema_export[n]), n  # without SWA the EMA is exported


def _capture_linear_inputs(model: GPT, x: torch.Tensor, y: torch.Tensor,
                           head: bool = False) -> dict[str, torch.Tensor]:
    """Reference X^T X (float64) of every bank-slice matmul (and with `head` of the tied head's,
    as "tok_emb.weight"), by intercepting F.linear."""
    views = model._bank_views() | ({"tok_emb.weight": model.tok_emb.weight} if head else {})
    ptr_to_name = {v.data_ptr(): n for n, v in views.items()}
    grams: dict[str, torch.Tensor] = {}
    orig = F.linear

    def spy(inp, w, *a, **k):
        name = ptr_to_name.get(w.data_ptr())
        if name is not None and tuple(w.shape) == tuple(views[name].shape):
            x2 = inp.detach().reshape(-1, inp.size(-1)).double()
            grams[name] = grams.get(name, 0) + x2.T @ x2
        return orig(inp, w, *a, **k)

    F.linear = spy
    try:
        with torch.no_grad():
            model(x, y)
    finally:
        F.linear = orig
    return grams


def _snapshot(tr) -> dict:
    """The trainer's raw weights and loader position now (from an on_step callback)."""
    return {"params": {n: p.detach().clone() for n, p in tr.model.named_parameters()},
            "loader": json.loads(json.dumps(tr.loader.state_dict()))}


def _assert_hessians_are_hand_xtx(r: T.TrainResult, state: dict, data_root: Path, head: bool = False) -> None:
    """r's Hessians = X^T X / rows of every matrix's inputs (with `head` also the tied head's), from
    the model in `state` on the 2048-token micro-batch the loader in `state` gives next (the one
    capture of the run)."""
    assert r.hessian_meta == {"rows": 2048, "accumulations": 1, "world_size": 1}
    model = GPT(mcfg(), train_seq_len=128)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state["params"][n])
    loader = DistributedTokenLoader(sorted((data_root / "shards").glob("fineweb_train_*.bin")))
    loader.load_state_dict(state["loader"])
    x, y = loader.next_batch(2048, 128)
    grams = _capture_linear_inputs(model, x, y, head)
    assert sorted(grams) == sorted(r.hessians) == sorted(model.quantizable_names() + ["tok_emb.weight"] * head)
    for n, g in grams.items():
        ref = (g / 2048).float()
        assert torch.allclose(r.hessians[n], ref, rtol=1e-4, atol=1e-6 * ref.abs().max()), n


def test_hessians_equal_hand_xtx_over_rows(data_root, tmp_path):
    before = {}

    def watch(tr):
        if tr.step == 2:  # the state the last step (index 2) starts from
            before.update(_snapshot(tr))

    # hessian_every 0: no scheduled capture, so exactly the forced one at the last step
    r = run(data_root, tmp_path, on_step=watch, iterations=3, hessian_every=0, late_qat_threshold=0.0)
    _assert_hessians_are_hand_xtx(r, before, data_root)


def test_hessian_head_adds_the_tied_heads_input_gram(data_root, tmp_path):
    """train.hessian_head: the run's Hessians also hold "tok_emb.weight", X^T X / rows of the rows
    the tied head multiplies (the final norm's output), for quantize.embed_mode gptq."""
    before = {}

    def watch(tr):
        if tr.step == 2:
            before.update(_snapshot(tr))

    r = run(data_root, tmp_path, on_step=watch, iterations=3, hessian_every=0, late_qat_threshold=0.0,
            hessian_head=True)
    assert r.hessians["tok_emb.weight"].shape == (MICRO_MODEL["model_dim"],) * 2
    _assert_hessians_are_hand_xtx(r, before, data_root, head=True)


def test_fallback_capture_after_the_clock_equals_hand_xtx(data_root, tmp_path, monkeypatch):
    """If no step captured (the schedule never says so), one extra micro-batch after training is
    captured with the final raw weights, through the same capture call as compiled steps."""
    from pgolf.train import hessian

    monkeypatch.setattr(hessian.HessianSchedule, "due", lambda self, step, scale, elapsed_ms: False)
    end = {}
    r = run(data_root, tmp_path, on_step=lambda tr: end.update(_snapshot(tr)), iterations=2,
            late_qat_threshold=0.0)
    assert hessian.FALLBACK_NOTE in r.log_text
    _assert_hessians_are_hand_xtx(r, end, data_root)


def test_calibration_hessians_equal_hand_xtx_on_the_exported_weights(data_root, tmp_path):
    """train.calibration_batches (PR #2135's GPTQ calibration): after training, calibration_batches
    batches of calibration_seqs rows of the training stream's next tokens through the exported
    (EMA) weights with the loop on; hessian_source calibration writes their per-row mean X^T X
    (with train.hessian_head also the tied head's), and no step captures online ones."""
    end, captured = {}, []
    m = mcfg(num_loops=1, loop_start=0, loop_end=0)  # a looped layer's matrices see two inputs

    def on_step(tr):
        end.update(_snapshot(tr))
        captured.append(tr.hess.accumulations)

    r = run(data_root, tmp_path, m=m, on_step=on_step, iterations=3, late_qat_threshold=0.0, hessian_head=True,
            calibration_batches=2, calibration_seqs=3, hessian_source="calibration")
    assert r.hessian_meta == {"rows": 2 * 3 * 128, "accumulations": 2, "world_size": 1}
    assert r.metrics["hessian_source"] == "calibration" and r.metrics["calibration_batches"] == 2
    assert r.metrics["calibration_rows"] == 768 and r.metrics["calibration_seconds"] >= 0
    assert r.metrics["hessian_accumulations"] == 2 and r.metrics["hessian_rows"] == 768  # the calibration's
    assert captured == [0, 0, 0] and r.metrics["hessian_overhead_pct"] is None  # no step captured online
    assert "calibration: 2 batches x 3 seqs of 128" in r.log_text
    model = GPT(m, train_seq_len=128)
    model.load_export_state_dict(r.export)
    model.set_looping(True)
    loader = DistributedTokenLoader(sorted((data_root / "shards").glob("fineweb_train_*.bin")))
    loader.load_state_dict(end["loader"])  # where training stopped
    grams: dict[str, torch.Tensor] = {}
    for _ in range(2):
        x, y = loader.next_batch(3 * 128, 128)
        for n, g in _capture_linear_inputs(model, x, y, head=True).items():
            grams[n] = grams.get(n, 0) + g
    assert sorted(grams) == sorted(r.hessians) == sorted(model.quantizable_names() + ["tok_emb.weight"])
    for n, g in grams.items():
        ref = (g / 768).float()
        assert torch.allclose(r.hessians[n], ref, rtol=1e-4, atol=1e-6 * ref.abs().max()), n
    saved, meta = train_files.load_hessians(tmp_path / "artifacts" / "train" / train_files.HESSIANS_FILE)
    assert meta == r.hessian_meta and all(torch.equal(saved[n], r.hessians[n]) for n in saved)


def test_the_quantize_stage_consumes_calibration_hessians_unchanged(data_root, tmp_path):
    """hessians.pgt from hessian_source calibration has the online file's format: quantize runs full
    GPTQ on every quantizable matrix with them (and on tok_emb with the head's, train.hessian_head)."""
    from pgolf.quantize import quantize as Q

    r = run(data_root, tmp_path, iterations=3, late_qat_threshold=0.0, hessian_head=True,
            calibration_batches=2, calibration_seqs=2, hessian_source="calibration")
    q = config.from_dict("quantize", {"passthrough_max_numel": 512, "embed_mode": "gptq"})
    m = Q.run(q, tmp_path / "artifacts/train", tmp_path / "artifacts/quant", tmp_path / "metrics/quant.json")
    inp = Q.load_inputs(tmp_path / "artifacts/train")
    assert all(torch.equal(inp.hessians[n], r.hessians[n]) for n in r.hessians)
    assert m["gptq_tensors"] == len(r.hessians) and m["embed_method"] == "gptq"


def test_calibration_off_or_online_source_leaves_the_outputs_byte_identical(data_root, tmp_path):
    """calibration_batches 0 (the default) is today's run; with calibration batches and
    hessian_source online the calibration only adds metrics: model.pgt and hessians.pgt unchanged."""
    a = run(data_root, tmp_path / "a", iterations=3, late_qat_threshold=0.0)
    b = run(data_root, tmp_path / "b", iterations=3, late_qat_threshold=0.0, calibration_batches=2,
            calibration_seqs=2)
    assert not any(k.startswith("calibration") or k == "hessian_source" for k in a.metrics)
    assert b.metrics["hessian_source"] == "online" and b.metrics["calibration_batches"] == 2
    for f in (train_files.MODEL_FILE, train_files.HESSIANS_FILE):
        assert (tmp_path / "a/artifacts/train" / f).read_bytes() == (tmp_path / "b/artifacts/train" / f).read_bytes()


# ----------------------------------------------------------------------------- bad input


def _old_outputs(tmp: Path, p: T.Paths) -> dict[Path, bytes]:
    files = {Path(p.out_dir) / "model.pgt": b"old model", Path(p.metrics): b"{}\n", Path(p.plots): b"old\n"}
    for f, b in files.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b)
    return files


@pytest.mark.parametrize("kw, err, msg", [
    ({"seq_len": 0}, ConfigError, "train.seq_len must be >= 1"),
    ({"seq_len": -5}, ConfigError, "train.seq_len"),
    ({"batch_tokens": 2000}, ConfigError, r"train.batch_tokens must be divisible .* got 2000"),
    ({"ema_decay": 1.0}, ConfigError, r"train.ema_decay must be in \[0, 1\)"),
    ({"late_qat_threshold": 1.5}, ConfigError, "train.late_qat_threshold"),
    ({"swa_threshold": -0.1}, ConfigError, "train.swa_threshold"),
    ({"matrix_lr": -0.01}, ConfigError, "train.matrix_lr must be >= 0"),
    ({"qat_clip_quantile": 0.0}, ConfigError, "train.qat_clip_quantile"),
    ({"muon_comm_dtype": "fp8"}, ConfigError, "train.muon_comm_dtype"),
    ({"iterations": 0}, ConfigError, "train.iterations"),
    ({"max_micro_batch_seqs": 0}, ConfigError, "train.max_micro_batch_seqs must be >= 1"),
    ({"adam_eps": 0.0}, ConfigError, "train.adam_eps"),
    ({"device": "tpu"}, ConfigError, "train.device"),
    ({"min_lr": 1.5}, ConfigError, r"train.min_lr must be in \[0, 1\]"),
    ({"loop_enable_frac": -0.1}, ConfigError, "train.loop_enable_frac"),
    ({"seq_len_schedule": ((64, 0.5), (32, 0.2))}, ConfigError, "train.seq_len_schedule"),
    ({"muon_ns_coeffs": "cubic"}, ConfigError, "train.muon_ns_coeffs must be one of"),
    ({"muon_ns_coeffs": "polar_express", "muon_ns_steps": 6}, ConfigError, "train.muon_ns_steps must be <= 5"),
])
def test_bad_train_params_fail_before_touching_outputs(data_root, tmp_path, kw, err, msg):
    """Range checks run where the section is loaded (config.check); the world-size batch check in run."""
    p = paths(data_root, tmp_path)
    old = _old_outputs(tmp_path, p)
    with pytest.raises(err, match=msg):
        T.run(mcfg(), config.check(tcfg(tmp_path, **kw)), p)
    assert {f: f.read_bytes() for f in old} == old


def test_bad_model_param_names_the_key(data_root, tmp_path):
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        T.run(config.check(mcfg(num_kv_heads=3)), tcfg(tmp_path), paths(data_root, tmp_path))


def test_bad_data_fails_with_named_file_and_keeps_outputs(data_root, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_root, bad)
    p = paths(bad, tmp_path)
    old = _old_outputs(tmp_path, p)
    m, t = mcfg(), tcfg(tmp_path)
    meta = json.loads((bad / "tokenizer" / "tokenizer.json").read_text())
    (bad / "tokenizer" / "tokenizer.json").write_text(json.dumps({**meta, "vocab_size": 2048}))
    with pytest.raises(T.TrainError, match="byte tables cover 1024 tokens, .*tokenizer.json says 2048"):
        T.run(m, t, p)
    (bad / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.run(m, t, p)
    for f in (bad / "shards").glob("fineweb_train_*"):
        f.unlink()
    with pytest.raises(ShardError, match="no fineweb_train_"):
        T.run(m, t, p)
    with pytest.raises(ShardError, match="shard folder not found"):
        T.run(m, t, dataclasses.replace(p, shards=tmp_path / "nowhere"))
    assert {f: f.read_bytes() for f in old} == old


def test_nan_loss_stops_clearly_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    def poison_after_9(tr):
        if tr.step == 9:
            with torch.no_grad():
                tr.model.tok_emb.weight.fill_(float("nan"))

    p = paths(data_root, tmp_path)
    old = _old_outputs(tmp_path, p)
    with pytest.raises(T.TrainError, match=r"diverged at step 12: loss nan .*last good checkpoint .* is kept"):
        run(data_root, tmp_path, on_step=poison_after_9, checkpoint_every=4, log_every=0)
    tensors, header = tensorfile.load(tmp_path / "ckpt" / checkpoint.CHECKPOINT_FILE, kind=checkpoint.CHECKPOINT_KIND)
    assert header["meta"]["step"] == 8  # the step-12 checkpoint was not written over it
    assert all(torch.isfinite(t).all() for n, t in tensors.items() if n.startswith("model/"))
    assert {f: f.read_bytes() for f in old} == old


def test_out_of_vocab_data_is_named(data_root, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_root, bad)
    p = paths(bad, tmp_path)
    good = read_shard(bad / "shards" / "fineweb_train_000000.bin")
    tok512 = _vocab512(bad)
    ok = np.minimum(good, 511).astype(np.uint16)
    write_shard(bad / "shards" / "fineweb_train_000000.bin", ok)
    late = ok.copy()
    late[-1] = 700  # the one bad id at the end of the second shard: reached only late in training
    write_shard(bad / "shards" / "fineweb_train_000001.bin", late)
    with pytest.raises(T.TrainError, match=r"fineweb_train_000001.bin: token id 700 >= model.vocab_size 512"):
        T.run(mcfg(vocab_size=512), tcfg(tmp_path), dataclasses.replace(p, tokenizer=tok512))
    toks = np.full(4000, 1000, dtype=np.uint16)
    write_shard(bad / "shards" / "fineweb_train_000000.bin", toks)
    with pytest.raises(T.TrainError, match=r"fineweb_train_000000.bin: token id 1000 >= model.vocab_size 512"):
        T.run(mcfg(vocab_size=512), tcfg(tmp_path), dataclasses.replace(p, tokenizer=tok512))


def _vocab512(root: Path) -> Path:
    """A tokenizer folder that claims 512 tokens (so only the shard check can fail)."""
    from pgolf.shared.byte_tables import ByteTables

    tok = root / "tok512"
    tok.mkdir()
    meta = json.loads((root / "tokenizer" / "tokenizer.json").read_text())
    (tok / "tokenizer.json").write_text(json.dumps({**meta, "vocab_size": 512}))
    ByteTables(torch.ones(512, dtype=torch.int16), torch.zeros(512, dtype=torch.bool),
               torch.zeros(512, dtype=torch.bool)).save(tok / "byte_tables.pgt")
    return tok


def test_stage_prints_clear_error_and_exits_1(tmp_path):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-m", "stages.params"], cwd=tmp_path, env=env).returncode == 0
    p = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 1 and "train: error: data/shards: shard folder not found" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- 2 processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, data_root: str, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pgolf.shared import dist

    for name, kw in (("steps", DIST_KW), ("clock", WALLCLOCK_KW)):
        out = Path(tmp) / name
        r = run(Path(data_root), out, **kw)
        tensorfile.save(out / f"rank{rank}.pgt", r.export, kind="w", meta={"metrics": {
            k: r.metrics[k] for k in ("steps", "world_size", "val_bpb_float", "hessian_accumulations", "stopped_by")}})
    dist.shutdown()


DIST_KW = dict(iterations=10, warmdown_iters=6, hessian_every=3, checkpoint_every=4, log_every=5)


def test_two_gloo_processes_match_each_other_and_one_process(data_root, tmp_path):
    mp.spawn(_dist_worker, args=(2, _free_port(), str(data_root), str(tmp_path)), nprocs=2, join=True)
    for name in ("steps", "clock"):
        w0, h0 = tensorfile.load(tmp_path / name / "rank0.pgt")
        w1, h1 = tensorfile.load(tmp_path / name / "rank1.pgt")
        for n in w0:
            assert torch.equal(w0[n], w1[n]), (name, n)
        assert h0["meta"]["metrics"] == h1["meta"]["metrics"]  # same steps: the stop is decided together
    clock = h0["meta"]["metrics"]
    assert clock["stopped_by"] == "wallclock" and clock["steps"] < WALLCLOCK_KW["iterations"]
    w0, h0 = tensorfile.load(tmp_path / "steps" / "rank0.pgt")
    m = h0["meta"]["metrics"]
    assert m["world_size"] == 2 and m["steps"] == 10 and m["stopped_by"] == "iterations"
    hs, hmeta = train_files.load_hessians(tmp_path / "steps" / "artifacts" / "train" / "hessians.pgt")
    assert hmeta["world_size"] == 2 and hmeta["rows"] == 2 * 1024 * hmeta["accumulations"]
    assert not (tmp_path / "steps" / "ckpt" / checkpoint.CHECKPOINT_FILE).exists()
    # one process, 2 micro-batches of the same 1024-token halves: the same run up to fp rounding
    one = run(data_root, tmp_path / "one", grad_accum_steps=2, **DIST_KW)
    assert one.metrics["val_bpb_float"] == pytest.approx(m["val_bpb_float"], abs=1e-5)
    for n in w0:
        assert torch.allclose(one.export[n], w0[n], atol=1e-5, rtol=0), (n, (one.export[n] - w0[n]).abs().max())


def test_wallclock_cap_stops_and_warms_down(data_root, tmp_path):
    r = run(data_root, tmp_path, **WALLCLOCK_KW)
    m = r.metrics
    assert m["stopped_by"] == "wallclock" and 1 < m["steps"] < WALLCLOCK_KW["iterations"]
    assert m["train_seconds"] >= WALLCLOCK_KW["max_wallclock_seconds"]
    assert m["hessian_accumulations"] == 1  # none scheduled (hessian_every 1000): the forced last-chance one
    scales = [row["lr_scale"] for row in r.rows]
    assert scales[0] == 1.0 and 0 <= scales[-1] < 0.5  # the step that crosses the cap runs at R/W < 1/10-ish


WALLCLOCK_KW = dict(iterations=100000, max_wallclock_seconds=1.5, warmdown_iters=10, hessian_every=1000,
                    hessian_start_scale=1.0, log_every=2)


def test_stage_relaunches_itself_under_torchrun(data_root, tmp_path):
    """`python -m stages.train` with train.nproc_per_node 2: torchrun, 2 gloo ranks, rank 0 writes."""
    import shutil

    shutil.copytree(data_root, tmp_path / "data")
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["model"].update(MICRO_MODEL)
    doc["train"].update({**MICRO_TRAIN, "nproc_per_node": 2, "iterations": 8, "checkpoint_every": 4})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    assert subprocess.run([sys.executable, "-m", "stages.params"], cwd=tmp_path, env=env).returncode == 0
    p = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    m = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 8
    outs = sorted(f.name for f in (tmp_path / "artifacts" / "train").iterdir())
    assert outs == ["hessians.pgt", "model.pgt", "train.log"]
    assert p.stdout.count("step:8/8") == 1  # printed by rank 0 only
    assert not (tmp_path / ".checkpoints" / "train" / checkpoint.CHECKPOINT_FILE).exists()


# ----------------------------------------------------------------------------- compile scopes


def _compiled_vs_eager(scope: str, **model_kw):
    """One forward+backward of an eager model and of a copy compiled in `scope` (aot_eager) ->
    (eager model, compiled model, (x, y), (eager loss, compiled loss), graphs built)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # graphs of earlier tests would serve alike blocks here too
    torch.manual_seed(0)
    m = mcfg(**model_kw)
    eager, compiled = GPT(m, train_seq_len=64), GPT(m, train_seq_len=64)
    compiled.load_state_dict(eager.state_dict())
    before = counters["stats"]["unique_graphs"]
    fwd = priming.compile_forward(compiled, scope, backend="aot_eager")  # dynamo + AOTAutograd, no kernels
    x = torch.randint(0, m.vocab_size, (2, 64))  # (B, T)
    y = torch.roll(x, -1, dims=1)
    loss_e, loss_c = eager(x, y), fwd(x, y)
    loss_e.backward()
    loss_c.backward()
    return eager, compiled, (x, y), (loss_e, loss_c), counters["stats"]["unique_graphs"] - before


KNOB_MODELS = {  # the seeds' blocks; the records' two lanes, depth recurrence and output gate
    "seed": dict(num_layers=4, xsa_last_n=2, ve_last_n=1),
    "records": dict(num_layers=4, xsa_last_n=4, ve_last_n=1, parallel_start_layer=3, num_loops=1,
                    loop_start=1, loop_end=2, attn_gate_window=8, smear_bos_mask=True, logit_softcap_neg=20.0),
}


@pytest.mark.parametrize("model", KNOB_MODELS)
@pytest.mark.parametrize("scope", config.COMPILE_SCOPES)
def test_compile_scopes_match_eager(scope, model):
    eager, compiled, _, (loss_e, loss_c), _ = _compiled_vs_eager(scope, **KNOB_MODELS[model])
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_blocks_scope_shares_one_graph_between_alike_blocks():
    # 6 layers, XSA in all, value embeddings in the last: graphs for the first block (its two
    # inputs are one tensor), the other plain blocks, the value-embedding block, the loss head.
    # Per-layer graphs (the layer index or its norm scale baked in) would be 6 + 1.
    eager, compiled, (x, y), _, graphs = _compiled_vs_eager("blocks", num_layers=6, xsa_last_n=6, ve_last_n=1)
    assert graphs == 4
    h_c, h_e = compiled.zero_hessians(), eager.zero_hessians()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # the trainer's capture
        compiled(x, y, hessians=h_c)
    with torch.no_grad():
        eager(x, y, hessians=h_e)
    for name in h_e:
        torch.testing.assert_close(h_c[name], h_e[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("mlp, qk", [(True, False), (False, True)])
def test_cuda_training_kernels_follow_the_train_section(tmp_path, mlp, qk):
    """What the trainer and the benches turn on for CUDA: TF32, and each block's fused kernels
    as train.fused_mlp / train.fused_qk_norm_rope say."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32  # (cuBLAS's flag object defeats monkeypatch)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        model = GPT(mcfg(), train_seq_len=128)
        priming.use_cuda_training_kernels(model, tcfg(tmp_path, fused_mlp=mlp, fused_qk_norm_rope=qk))
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
    assert (model.use_fused_mlp, model.use_fused_qk) == (mlp, qk)
    assert all((b.mlp.use_fused, b.attn.use_fused) == (mlp, qk) for b in model.blocks)


@pytest.mark.parametrize("scope", config.COMPILE_SCOPES)
def test_compiled_training_primes_two_steps_and_learns_as_eager(data_root, tmp_path, monkeypatch, scope):
    """The trainer's compiled path on the CPU (dynamo + AOTAutograd, no kernels): priming stops
    after its second step, which builds nothing; the Hessians come from the separate eager
    capture forward; weights and Hessians match the eager run's."""
    torch._dynamo.reset()

    class CompiledOnCPU(T.Trainer):
        def _build_model(self):
            model, _ = super()._build_model()
            self.compiled = True
            return model, priming.compile_forward(model, scope, backend="aot_eager")

    kw = dict(iterations=8, hessian_every=4, warmup_steps=6)
    eager = run(data_root, tmp_path / "eager", **kw)
    monkeypatch.setattr(T, "Trainer", CompiledOnCPU)
    compiled = run(data_root, tmp_path / "compiled", **kw)
    assert compiled.metrics["warmup_steps_run"] == 2
    assert re.search(r"graphs built [1-9]\d*, 0\n", compiled.log_text)
    assert compiled.hessian_meta["accumulations"] == eager.hessian_meta["accumulations"] > 0
    for name in eager.hessians:
        torch.testing.assert_close(compiled.hessians[name], eager.hessians[name], rtol=1e-4, atol=1e-5, msg=name)
    for name in eager.export:
        torch.testing.assert_close(compiled.export[name], eager.export[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_autotune_hands_inductor_its_max_autotune_options(monkeypatch):
    """`train.compile_autotune` reaches torch.compile as inductor options (mode and options cannot
    both be given): max-autotune and coordinate descent added to pgolf's own, for both scopes."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    for scope in ("model", "blocks"):
        for autotune in (False, True):
            seen.clear()
            priming.compile_forward(GPT(mcfg(), train_seq_len=128), scope, autotune=autotune)
            assert seen and all(kw["options"]["triton.mix_order_reduction"] is False for kw in seen)
            assert all(kw["options"].get("max_autotune", False) is autotune for kw in seen)
            assert all(kw["options"].get("coordinate_descent_tuning", False) is autotune for kw in seen)
