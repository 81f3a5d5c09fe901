"""Tests of pgolf.train.checkpoint on its own: state trees through a tensorfile, the fingerprint and its
diff, reading a missing / unreadable / foreign file, the completeness check, and a save -> load ->
apply round trip into fresh parts that restores every piece of state (model, optimizer, EMA/SWA,
Hessian sums, timers, log, RNG, counters) and keeps the documented file layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import MICRO_CFG, TINY_PARAMS
from pgolf.train import checkpoint as C
from pgolf import config
from pgolf.shared import tensorfile
from pgolf.train import hessian
from pgolf.train.averages import WeightAverages
from pgolf.shared.dist import DistInfo
from pgolf.shared.model import GPT
from pgolf.train.optim import build_optimizers
from pgolf.train.timing import StepTimer
from pgolf.train.outputs import RunLog

pytestmark = pytest.mark.usefixtures("one_thread")

INFO = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
DATA_ID = {"train_shards": [["fineweb_train_000000.bin", 10000]], "tokenizer_sha256": "ab"}
META_KEYS = ["fingerprint", "step", "elapsed_ms", "qat_on", "qat_start_step", "loop_start_step", "swa_count",
             "swa_first_step", "hessian", "optimizer", "loader", "step_ms", "step_kind", "log_lines", "rows"]


def tcfg(tmp: Path, **kw) -> config.TrainConfig:
    base = config.load("train", TINY_PARAMS)
    return dataclasses.replace(base, device="cpu", checkpoint_dir=str(tmp / "ckpt"), swa_enabled=True,
                               swa_every=1, swa_threshold=1.0, **kw)


def fresh_parts(cfg: config.TrainConfig, seed: int) -> C.Parts:
    torch.manual_seed(seed)
    model = GPT(MICRO_CFG, train_seq_len=16)
    acc = hessian.HessianAccumulator(model.hessian_shapes(), "cpu")
    schedule = hessian.HessianSchedule(acc, cfg.hessian_every, cfg.hessian_start_scale, cfg.iterations, 0.0)
    return C.Parts(model, build_optimizers(model.optimizer_groups(), cfg, INFO), WeightAverages(model, 0.9, cfg),
                   acc, schedule, StepTimer(cuda=False), RunLog(False))


def train_a_little(parts: C.Parts, steps: int) -> None:
    """`steps` optimizer steps on random tokens (capturing Hessians on the last), EMA, SWA, timers, log."""
    for step in range(steps):
        x = torch.randint(0, MICRO_CFG.vocab_size, (2, 16))  # (B, T)
        capture = parts.schedule.due(step, 0.5, 0.0) or step == steps - 1
        parts.timer.start()
        loss = parts.model(x, x.roll(-1, 1), hessians=parts.hess.sums if capture else None)
        loss.backward()
        parts.opt.step(1.0, 0.95)
        parts.opt.zero_grad(set_to_none=True)
        if capture:
            parts.hess.record(x.numel())
        parts.timer.stop()
        parts.schedule.label(capture, 0.5)
        parts.avg.update_ema()
        parts.avg.maybe_snapshot(step + 1, 0.5)
        parts.log(f"step {step + 1}")
        parts.log.rows.append({"step": step + 1, "train_loss": float(loss.detach())})


def test_state_tree_round_trip_through_tensorfile():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 5: {}},
             "param_groups": [{"betas": (0.9, 0.99), "lr": 0.1 / 3, "params": [0, 5], "fused": None,
                               "eps": 1e-8, "name": "x"}]}
    tensors, tree = C.encode_tree(state, "opt")
    blob = tensorfile.dumps(tensors, "t", {"tree": tree})
    back, header = tensorfile.loads(blob)
    out = C.decode_tree(back, json.loads(json.dumps(header["meta"]["tree"])))
    assert set(out["state"]) == {0, 5} and out["param_groups"][0]["betas"] == (0.9, 0.99)
    assert out["param_groups"][0]["lr"] == 0.1 / 3 and out["param_groups"][0]["fused"] is None
    assert torch.equal(out["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    del back[next(iter(back))]
    with pytest.raises(C.CheckpointError, match="missing from the checkpoint"):
        C.decode_tree(back, tree)
    with pytest.raises(TypeError):
        C.encode_tree({(1, 2): 3}, "x")


def test_fingerprint_ignores_the_log_and_checkpoint_knobs_and_diff_names_the_rest(tmp_path):
    cfg = tcfg(tmp_path)
    fp = C.fingerprint(MICRO_CFG, cfg, 1, DATA_ID)
    assert fp["version"] == C.CHECKPOINT_VERSION and fp["world_size"] == 1 and fp["data"] == DATA_ID
    assert not set(C.FINGERPRINT_EXCLUDE) & set(fp["train"])
    moved = dataclasses.replace(cfg, log_every=3, checkpoint_every=7, checkpoint_dir="elsewhere")
    assert C.diff(fp, C.fingerprint(MICRO_CFG, moved, 1, DATA_ID)) == []
    other = C.fingerprint(MICRO_CFG, dataclasses.replace(cfg, matrix_lr=0.02), 2, DATA_ID)
    assert C.diff(fp, other) == [f"train.matrix_lr: {cfg.matrix_lr!r} -> 0.02", "world_size: 1 -> 2"]
    assert C.checkpoint_path(cfg) == tmp_path / "ckpt" / "train_state.pgt"


def test_read_says_why_nothing_is_usable(tmp_path):
    path, fp = tmp_path / "ckpt.pgt", {"version": 1, "a": 1}
    assert C.read(path, fp) == (None, None, "no checkpoint")
    path.write_bytes(b"PGOLFTF\x00garbage")
    assert C.read(path, fp)[2].startswith("checkpoint unreadable")
    tensorfile.save(path, {"x": torch.zeros(1)}, kind=C.CHECKPOINT_KIND, meta={"fingerprint": {"version": 1, "a": 2}})
    assert C.read(path, fp)[2] == f"checkpoint {path} is for another configuration (a: 2 -> 1)"
    tensors, meta, why = C.read(path, {"version": 1, "a": 2})
    assert why == "ok" and set(tensors) == {"x"} and meta["fingerprint"]["a"] == 2


def test_resume_round_trip_restores_every_piece_of_state(tmp_path):
    cfg = tcfg(tmp_path, hessian_every=2, hessian_start_scale=1.0)
    a = fresh_parts(cfg, seed=0)
    train_a_little(a, 3)
    a.model.set_qat(True)
    fp = C.fingerprint(MICRO_CFG, cfg, 1, DATA_ID)
    progress = C.Progress(step=3, elapsed_ms=123.5, qat_start_step=2, loop_start_step=0, loader={"pos": 7})
    path = C.checkpoint_path(cfg)
    path.parent.mkdir(parents=True)
    C.save(path, a, fp, progress, INFO)
    rng_after_save = torch.get_rng_state()

    _, header = tensorfile.load(path, kind=C.CHECKPOINT_KIND)
    assert sorted(header["meta"]) == sorted(META_KEYS)  # the documented layout
    prefixes = {n.split("/")[0] for n in tensorfile.load(path, kind=C.CHECKPOINT_KIND)[0]}
    assert prefixes == {"model", "ema", "swa", "opt", "hess", "rng"}

    b = fresh_parts(cfg, seed=1)
    torch.manual_seed(99)
    tensors, meta, why = C.load(path, fp, b.model, INFO)
    assert why == "ok"
    assert C.apply(tensors, meta, b, INFO.rank) == progress
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    assert all(torch.equal(x, y) for x, y in zip(a.avg.ema, b.avg.ema))
    assert b.avg.swa_count == a.avg.swa_count == 3 and all(torch.equal(x, y) for x, y in zip(a.avg.swa_sum, b.avg.swa_sum))
    assert json.dumps(C.encode_tree(a.opt.state_dict(), "o")[1]) == json.dumps(C.encode_tree(b.opt.state_dict(), "o")[1])
    assert all(torch.equal(a.hess.sums[n], b.hess.sums[n]) for n in a.hess.sums)
    assert (b.hess.rows, b.hess.accumulations) == (a.hess.rows, a.hess.accumulations) == (64, 2)
    assert b.timer.ms == a.timer.ms and b.schedule.step_kind == a.schedule.step_kind == ["h", "w", "h"]
    assert b.log.lines == a.log.lines and b.log.rows == a.log.rows
    assert b.model.qat_on and b.model.looping == a.model.looping
    b.opt.step(1.0, 0.95)  # the restored optimizer state is usable


def test_incomplete_or_mismatched_checkpoints_are_not_loaded(tmp_path):
    cfg = tcfg(tmp_path)
    a = fresh_parts(cfg, seed=0)
    train_a_little(a, 1)
    fp = C.fingerprint(MICRO_CFG, cfg, 1, DATA_ID)
    path = tmp_path / "c.pgt"
    C.save(path, a, fp, C.Progress(1, 1.0, None, 0, {}), INFO)
    tensors, meta, _ = C.read(path, fp)
    assert C.complete(tensors, meta, a.model, rank=0)
    name = next(n for n in tensors if n.startswith("hess/"))
    del tensors[name]
    assert not C.complete(tensors, meta, a.model, rank=0) and C.complete(tensors, meta, a.model, rank=1)
    tensorfile.save(path, tensors, kind=C.CHECKPOINT_KIND, meta=meta)
    assert C.load(path, fp, a.model, INFO) == (None, None, f"checkpoint {path} is incomplete (tensors missing or mis-shaped)")
    other = C.fingerprint(MICRO_CFG, cfg, 1, {**DATA_ID, "tokenizer_sha256": "cd"})
    assert "data.tokenizer_sha256: 'ab' -> 'cd'" in C.load(path, other, a.model, INFO)[2]
