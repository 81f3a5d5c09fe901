"""Resumable training checkpoints (DVC 3 has none): the file, what must match, and how a run resumes.

This module owns the checkpoint file `<train.checkpoint_dir>/train_state.pgt`: one pgolf
tensorfile of kind "train_checkpoint" holding the whole training state, so that a killed run
resumes from it bit-exactly. Its layout (version `CHECKPOINT_VERSION`):

* tensors: `model/<param>` (live weights), `ema/<param>` and, once SWA snapshotted, `swa/<param>`
  (pgolf.train.averages), `opt/<i>` (the optimizer state's tensors, see `encode_tree`),
  `hess/<matrix>` (the Hessian sums over all ranks, held by rank 0), `rng/torch_cpu`.
* meta: `fingerprint` (what must match to resume, see `fingerprint`), `step`, `elapsed_ms`,
  `qat_on`, `qat_start_step`, `loop_start_step`, `swa_count`, `swa_first_step`, `hessian`
  ({rows, accumulations}), `optimizer` (the JSON half of the optimizer state tree), `loader`,
  `step_ms`, `step_kind` (the Hessian schedule's per-step kinds), `log_lines`, `rows`.

`save` writes it (a collective when distributed; rank 0 writes, atomically); `resume` reads it,
checks the fingerprint and that every tensor is there with its shape (every rank agrees), and
applies it to the model, optimizer, averages, Hessian buffers, timers and log (`Parts`),
returning the trainer's counters (`Progress`). The trainer decides when to save and deletes the
file after a successful run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch import Tensor

from pgolf.shared import tensorfile
from pgolf import config
from pgolf.config import ModelConfig, TrainConfig

if TYPE_CHECKING:
    from pgolf.train.averages import WeightAverages
    from pgolf.shared.dist import DistInfo
    from pgolf.train.hessian import HessianAccumulator, HessianSchedule
    from pgolf.shared.model import GPT
    from pgolf.train.timing import StepTimer
    from pgolf.train.outputs import RunLog

CHECKPOINT_FILE = "train_state.pgt"
CHECKPOINT_KIND = "train_checkpoint"
CHECKPOINT_VERSION = 1
FINGERPRINT_EXCLUDE = ("log_every", "checkpoint_every", "checkpoint_dir")  # knobs that may change on resume


class CheckpointError(ValueError):
    """A checkpoint whose state cannot be rebuilt (a tensor its meta names is missing)."""


@dataclass
class Parts:
    """The stateful objects of a run that a checkpoint saves and restores."""

    model: GPT
    opt: Any  # pgolf.train.optim's combined optimizer (state_dict / load_state_dict)
    avg: WeightAverages
    hess: HessianAccumulator
    schedule: HessianSchedule
    timer: StepTimer
    log: RunLog


@dataclass
class Progress:
    """The trainer's counters a checkpoint carries (meta keys of the same names)."""

    step: int
    elapsed_ms: float
    qat_start_step: int | None
    loop_start_step: int | None
    loader: dict  # DistributedTokenLoader.state_dict()


# ----------------------------------------------------------------------------- identity


def fingerprint(mcfg: ModelConfig, cfg: TrainConfig, world_size: int, data_id: dict) -> dict:
    """What must match for a checkpoint to be resumed: model + train params (minus the log and
    checkpoint knobs), world size, the training shards (names, sizes) and the tokenizer."""
    train = {k: v for k, v in config.to_dict(cfg).items() if k not in FINGERPRINT_EXCLUDE}
    return {"version": CHECKPOINT_VERSION, "model": config.to_dict(mcfg), "train": train,
            "world_size": world_size, "data": data_id}


def diff(a, b, path: str = "") -> list[str]:
    """The leaves where two nested dicts differ, as "dotted.key: old -> new"."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def checkpoint_path(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint_dir) / CHECKPOINT_FILE


# ----------------------------------------------------------------------------- state trees


def encode_tree(obj, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """Split a nested state (dicts with int/str keys, lists, tuples, tensors, scalars) into
    (named CPU tensors, a JSON-able structure) for pgolf.shared.tensorfile; `decode_tree` inverts it.
    Key types and tuples survive the round trip; nothing is pickled."""
    tensors: dict[str, Tensor] = {}

    def enc(o):
        if isinstance(o, Tensor):
            name = f"{prefix}/{len(tensors)}"
            tensors[name] = o.detach().cpu().clone()
            return {"t": name}
        if isinstance(o, dict):
            for k in o:
                if not isinstance(k, (int, str)) or isinstance(k, bool):
                    raise TypeError(f"state tree {prefix!r}: cannot store dict key {k!r}")
            return {"d": [[k, enc(v)] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return {"l" if isinstance(o, list) else "u": [enc(v) for v in o]}
        if o is None or isinstance(o, (bool, int, float, str)):
            return {"v": o}
        raise TypeError(f"state tree {prefix!r}: cannot store a {type(o).__name__}")

    return tensors, enc(obj)


def decode_tree(tensors: dict[str, Tensor], node: dict):
    """Rebuild what `encode_tree` split; a missing tensor raises CheckpointError."""
    if "t" in node:
        if node["t"] not in tensors:
            raise CheckpointError(f"state tensor {node['t']!r} missing from the checkpoint")
        return tensors[node["t"]]
    if "d" in node:
        return {k: decode_tree(tensors, v) for k, v in node["d"]}
    if "l" in node:
        return [decode_tree(tensors, v) for v in node["l"]]
    if "u" in node:
        return tuple(decode_tree(tensors, v) for v in node["u"])
    return node["v"]


# ----------------------------------------------------------------------------- read and check


def read(path: Path, expected: dict) -> tuple[dict[str, Tensor] | None, dict | None, str]:
    """(tensors, meta, why) -> tensors None when there is nothing usable (`why` says why)."""
    if not path.is_file():
        return None, None, "no checkpoint"
    try:
        tensors, header = tensorfile.load(path, kind=CHECKPOINT_KIND)
    except tensorfile.TensorFileError as e:
        return None, None, f"checkpoint unreadable ({e})"
    meta = header["meta"]
    changes = diff(meta.get("fingerprint"), expected)
    if changes:
        shown = "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "")
        return None, None, f"checkpoint {path} is for another configuration ({shown})"
    return tensors, meta, "ok"


def complete(tensors: dict[str, Tensor], meta: dict, model: GPT, rank: int) -> bool:
    """Every tensor this rank will load is present with its shape (Hessian sums: rank 0 only)."""
    params = list(model.named_parameters())
    want = {f"model/{n}": p.shape for n, p in params}
    want.update({f"ema/{n}": p.shape for n, p in params})
    if int(meta.get("swa_count", 0)) > 0:
        want.update({f"swa/{n}": p.shape for n, p in params})
    if rank == 0:
        want.update({f"hess/{n}": (k, k) for n, k in model.hessian_shapes().items()})
    return all(n in tensors and tuple(tensors[n].shape) == tuple(s) for n, s in want.items())


def _every_rank_agrees(ok: bool, info: DistInfo) -> bool:
    """MIN over ranks of `ok` (itself when not distributed)."""
    if not info.enabled:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=info.device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
    return flag.item() != 0


def load(path: Path, expected: dict, model: GPT, info: DistInfo) -> tuple[dict | None, dict | None, str]:
    """(tensors, meta, "ok") of a checkpoint every rank can resume from, else (None, None, why)."""
    tensors, meta, why = read(path, expected)
    ok = tensors is not None and complete(tensors, meta, model, info.rank)
    if tensors is not None and not ok:
        why = f"checkpoint {path} is incomplete (tensors missing or mis-shaped)"
    if ok != _every_rank_agrees(ok, info):
        ok, why = False, "checkpoint not readable on every rank"
    return (tensors, meta, why) if ok else (None, None, why)


# ----------------------------------------------------------------------------- apply and save


@torch.no_grad()
def apply(tensors: dict[str, Tensor], meta: dict, parts: Parts, rank: int) -> Progress:
    """Put a loaded checkpoint's state into `parts` (and the torch CPU RNG); the counters back."""
    for n, p in parts.model.named_parameters():
        p.copy_(tensors[f"model/{n}"])
    parts.avg.load_state_tensors(tensors, meta)
    parts.opt.load_state_dict(decode_tree(tensors, meta["optimizer"]))
    hess = {n[len("hess/"):]: t for n, t in tensors.items() if n.startswith("hess/")}
    parts.hess.load_state_tensors(hess, meta["hessian"], rank)
    if "rng/torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng/torch_cpu"])
    parts.model.set_looping(meta["loop_start_step"] is not None)
    if meta["qat_on"]:
        parts.model.set_qat(True)
    parts.timer.load(meta["step_ms"])
    parts.schedule.step_kind = list(meta["step_kind"])
    parts.log.lines = list(meta["log_lines"])
    parts.log.rows = list(meta["rows"])
    return Progress(int(meta["step"]), float(meta["elapsed_ms"]), meta["qat_start_step"],
                    meta["loop_start_step"], meta["loader"])


def save(path: Path, parts: Parts, fp: dict, progress: Progress, info: DistInfo) -> None:
    """Write the checkpoint of `parts` + `progress` under fingerprint `fp` (atomic rename).
    A collective when distributed (the Hessian sums); rank 0 writes."""
    tensors = {f"model/{n}": p.detach().cpu() for n, p in parts.model.named_parameters()}
    tensors.update({k: v.detach().cpu() for k, v in parts.avg.state_tensors().items()})
    opt_tensors, opt_tree = encode_tree(parts.opt.state_dict(), "opt")
    tensors.update(opt_tensors)
    hess_tensors, hess_meta = parts.hess.state_tensors(info.rank)
    tensors.update({f"hess/{n}": t for n, t in hess_tensors.items()})
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    if not info.is_main:
        return
    meta = {"fingerprint": fp, "step": progress.step, "elapsed_ms": progress.elapsed_ms,
            "qat_on": parts.model.qat_on, "qat_start_step": progress.qat_start_step,
            "loop_start_step": progress.loop_start_step,
            "swa_count": parts.avg.swa_count, "swa_first_step": parts.avg.swa_first_step,
            "hessian": hess_meta, "optimizer": opt_tree, "loader": progress.loader,
            "step_ms": parts.timer.ms, "step_kind": parts.schedule.step_kind,
            "log_lines": parts.log.lines, "rows": parts.log.rows}
    tensorfile.save(path, tensors, kind=CHECKPOINT_KIND, meta=meta)
