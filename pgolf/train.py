"""The training loop of the record recipe (recipe-spec §4, §6.5) and the train stage's outputs.

This module owns one training run, from the validated `model` + `train` params to the files of
the train stage:

* schedule (`lr_scale`, `muon_momentum_at`): no LR warmup; the warmdown multiplier is
  wallclock-based (§4.5: W = warmdown_iters * mean step ms, remaining R = cap - elapsed,
  scale = R/W once R <= W, so it reaches 0 at the cap), or step-based over the last
  `warmdown_iters` of `iterations` when `max_wallclock_seconds` is 0. Muon momentum ramps
  linearly from `muon_momentum_warmup_start` to `muon_momentum` over its warmup steps. The
  optimizers get `lr_multiplier` = max(scale, `min_lr`); the logged lr_scale is that multiplier.
* a step: `grad_accum_steps` micro-batches (bf16 autocast + torch.compile on CUDA, fp32 eager on
  CPU), clip by the global grad norm, Muon + AdamW
  (pgolf.optim), then the EMA update. Nothing in a step waits for the device: step times come
  from CUDA events read lazily (`StepTimer`), the wallclock from the host clock (bounded ahead of
  the device by the launch queue; the clock stops only after a final synchronisation). The
  elapsed time is all-reduced (MAX) after every step, so every rank computes the same lr scale
  and stops on the same step when the wallclock cap is reached.
* compile priming (§4.5): `warmup_steps` real steps (the last one with a Hessian capture), then
  the model, optimizer state and loader are restored.
* sequence-length schedule (`seq_len_schedule`): shorter sequences (same tokens per step) until
  given training fractions, then `seq_len`; compile priming runs every length.
* depth recurrence (`model.num_loops`): off until `training_frac` reaches `loop_enable_frac`
  (compile priming runs both graphs), on for the final evaluation and in the export.
* late QAT: `model.set_qat(True)` the first time the scale drops below `late_qat_threshold`;
  each step's forwards/backwards then run inside `model.qat_weights()` (Q(w) swapped into the
  banks, straight-through gradients), so the compiled graph never changes.
* online Hessians (pgolf.hessian): on a capture step, the step's first micro-batch feeds them:
  inside its training forward when the model runs eagerly (CPU), or, when that forward is
  compiled, through one extra no-grad forward of the uncompiled model with the same weights (so
  only one graph is ever compiled).
* weight averages (`WeightAverages`): the EMA (fp32, every step) of all parameters; SWA, when
  enabled, averages the *live* training weights (not the EMA) at every step s with
  s % swa_every == 0 whose lr scale was < swa_threshold. The exported weights are the SWA
  average if at least one snapshot was taken, else the EMA.
* resumable checkpoints (DVC 3 has none): every `checkpoint_every` steps one tensorfile with
  the whole training state (see `save_checkpoint`); a run whose fingerprint matches resumes
  from it bit-exactly; it is deleted after a successful run.
* outputs (rank 0): artifacts/train/{model.pgt, hessians.pgt, train.log} through one staged
  folder, metrics/train.json, plots/train.tsv.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor
from torch.profiler import record_function

from pgolf import dist, hessian, tensorfile
from pgolf.config import ConfigError, ModelConfig, TrainConfig
from pgolf.data import (DistributedTokenLoader, list_shards, load_byte_tables, max_token_id,
                        read_shard, read_shard_header, read_tokenizer_meta)
from pgolf.io import atomic_write_text, staged_dir, write_json
from pgolf.model import GPT, QAT_BITS, layer_order, validate_config
from pgolf.optim import build_optimizers, ns_coefficients

CHECKPOINT_FILE = "train_state.pgt"
CHECKPOINT_KIND = "train_checkpoint"
CHECKPOINT_VERSION = 1
FINGERPRINT_EXCLUDE = ("log_every", "checkpoint_every", "checkpoint_dir")  # knobs that may change on resume
TSV_COLUMNS = ("step", "train_loss", "lr_scale", "tokens_per_second")


class TrainError(ValueError):
    """Bad training input (data, tokenizer, checkpoint) or a diverged run; names the file/param."""


@dataclass(frozen=True)
class Paths:
    """Where the train stage reads and writes (dvc.yaml's deps/outs), relative to the cwd."""

    shards: Path = Path("data/shards")
    tokenizer: Path = Path("data/tokenizer")
    out_dir: Path = Path("artifacts/train")
    metrics: Path = Path("metrics/train.json")
    plots: Path = Path("plots/train.tsv")


@dataclass
class TrainResult:
    metrics: dict
    export: dict[str, Tensor]  # the exported fp32 weights (GPT.export_state_dict names), CPU
    hessians: dict[str, Tensor]
    hessian_meta: dict
    log_text: str
    rows: list[dict] = field(default_factory=list)  # the plots/train.tsv rows


# ----------------------------------------------------------------------------- config checks


def validate(cfg: TrainConfig, mcfg: ModelConfig) -> None:
    """Range checks of the `train` section (and the model's own); ConfigError names the key."""
    def bad(key, why):
        raise ConfigError(f"params.yaml: train.{key} {why}, got {getattr(cfg, key)!r}")

    try:
        validate_config(mcfg)
    except ValueError as e:
        raise ConfigError(f"params.yaml: {e}") from None
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad("device", "must be auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        bad("device", "is cuda but CUDA is not available")
    if cfg.muon_comm_dtype not in ("auto", "bf16", "fp32"):
        bad("muon_comm_dtype", "must be auto, bf16 or fp32")
    for key in ("nproc_per_node", "batch_tokens", "seq_len", "iterations", "muon_ns_steps", "swa_every",
                "val_batch_seqs"):
        if getattr(cfg, key) < 1:
            bad(key, "must be >= 1")
    for key in ("grad_accum_steps", "warmdown_iters", "warmup_steps", "muon_momentum_warmup_steps",
                "hessian_every", "val_tokens", "log_every", "checkpoint_every", "max_wallclock_seconds",
                "matrix_lr", "scalar_lr", "tied_embed_lr", "muon_wd", "adam_wd", "grad_clip"):
        if not getattr(cfg, key) >= 0:  # also rejects NaN
            bad(key, "must be >= 0")
    for key in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2", "ema_decay"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            bad(key, "must be in [0, 1)")
    try:
        ns_coefficients(cfg.muon_ns_coeffs, cfg.muon_ns_steps)
    except ValueError as e:
        raise ConfigError(f"params.yaml: {e}") from None
    for key in ("swa_threshold", "late_qat_threshold", "min_lr", "loop_enable_frac"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            bad(key, "must be in [0, 1]")
    if not cfg.hessian_start_scale >= 0:  # > 1: capture from the first step (the scale is <= 1)
        bad("hessian_start_scale", "must be >= 0")
    if not 0.0 < cfg.qat_clip_quantile <= 1.0:
        bad("qat_clip_quantile", "must be in (0, 1]")
    if not cfg.adam_eps > 0:
        bad("adam_eps", "must be > 0")
    if cfg.checkpoint_every > 0 and not cfg.checkpoint_dir:
        bad("checkpoint_dir", "must name a folder when train.checkpoint_every > 0")
    if cfg.seq_len > cfg.batch_tokens:
        bad("seq_len", f"must be <= train.batch_tokens ({cfg.batch_tokens})")
    parse_seq_len_schedule(cfg)


def parse_seq_len_schedule(cfg: TrainConfig) -> list[tuple[int, float]]:
    """`train.seq_len_schedule` "LEN@FRAC,..." -> [(LEN, FRAC)]: each LEN (<= train.seq_len) is used
    while training_frac < its FRAC (increasing, in (0, 1]), then train.seq_len. "" -> []."""
    if not cfg.seq_len_schedule.strip():
        return []
    out = []
    for item in cfg.seq_len_schedule.split(","):
        try:
            length, frac = item.split("@")
            out.append((int(length), float(frac)))
        except ValueError:
            raise ConfigError(f"params.yaml: train.seq_len_schedule must be 'LEN@FRAC,...', got "
                              f"{cfg.seq_len_schedule!r}") from None
    fracs = [f for _, f in out]
    if not all(0 < f <= 1 for f in fracs) or fracs != sorted(set(fracs)):
        raise ConfigError(f"params.yaml: train.seq_len_schedule fractions must increase within (0, 1], "
                          f"got {cfg.seq_len_schedule!r}")
    if not all(1 <= n <= cfg.seq_len for n, _ in out):
        raise ConfigError(f"params.yaml: train.seq_len_schedule lengths must be in [1, train.seq_len="
                          f"{cfg.seq_len}], got {cfg.seq_len_schedule!r}")
    return out


def seq_len_at(frac: float, cfg: TrainConfig, schedule: list[tuple[int, float]]) -> int:
    """The training sequence length at training_frac `frac` under the parsed schedule."""
    return next((n for n, until in schedule if frac < until), cfg.seq_len)


def resolve_grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """train.grad_accum_steps, or 8 // world_size (at least 1) when it is 0, as the records."""
    return cfg.grad_accum_steps if cfg.grad_accum_steps > 0 else max(1, 8 // world_size)


def check_batch(cfg: TrainConfig, world_size: int, accum: int) -> int:
    """Tokens of one micro-batch per rank; ConfigError unless the global batch splits evenly into
    sequences of train.seq_len and of every length of train.seq_len_schedule."""
    for key, n in [("seq_len", cfg.seq_len)] + [("seq_len_schedule", n) for n, _ in parse_seq_len_schedule(cfg)]:
        denom = world_size * accum * n
        if cfg.batch_tokens % denom:
            raise ConfigError(
                f"params.yaml: train.batch_tokens ({cfg.batch_tokens}) must be divisible by world_size * "
                f"grad_accum_steps * train.{key} = {world_size} * {accum} * {n} = {denom}")
    return cfg.batch_tokens // (world_size * accum)


# ----------------------------------------------------------------------------- schedule


def lr_scale(step: int, elapsed_ms: float, cfg: TrainConfig) -> float:
    """The warmdown multiplier before step `step` (0-based) after `elapsed_ms` of training (§4.5).

    Wallclock: step_ms = elapsed/step, W = warmdown_iters*step_ms, R = max(cap - elapsed, 0),
    scale = R/W if R <= W else 1. Step-based (cap 0): (iterations - step)/warmdown_iters over
    the last warmdown_iters steps, else 1. warmdown_iters 0: always 1.
    """
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        if start <= step < cfg.iterations:
            return max((cfg.iterations - step) / cfg.warmdown_iters, 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = cfg.warmdown_iters * step_ms
    remaining_ms = max(cfg.max_wallclock_seconds * 1000.0 - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def lr_multiplier(scale: float, cfg: TrainConfig) -> float:
    """The lr multiplier the optimizers get: the warmdown scale floored at `train.min_lr` (the
    records' MIN_LR). Late QAT, SWA and the Hessian window keep reading the unfloored scale."""
    return max(scale, cfg.min_lr)


def training_frac(step: int, elapsed_ms: float, cfg: TrainConfig) -> float:
    """How far training is before step `step`: elapsed / cap with a wallclock cap, else
    step / iterations (the records' rule for switching depth recurrence on)."""
    cap_ms = cfg.max_wallclock_seconds * 1000.0
    return elapsed_ms / cap_ms if cap_ms > 0 else step / cfg.iterations


def muon_momentum_at(step: int, cfg: TrainConfig) -> float:
    """Linear ramp muon_momentum_warmup_start -> muon_momentum over muon_momentum_warmup_steps."""
    n = cfg.muon_momentum_warmup_steps
    frac = min(step / n, 1.0) if n > 0 else 1.0
    return (1.0 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def hessian_overhead(step_ms: list[float], step_kind: list[str], every: int) -> dict:
    """The cost of online Hessians from per-step times (kinds: "h" Hessian step, "w" normal step
    inside the Hessian window, "n" other).

    Median ms of the Hessian steps vs the normal steps of the window (all non-Hessian steps but
    the first when the window has none); the extra ms per Hessian step amortised over `every`
    steps (over all steps when `every` is 0), as % of the normal step time. Medians, so one-off
    costs (a recompile, a stall of the machine) do not count.
    """
    h = [t for t, k in zip(step_ms, step_kind) if k == "h"]
    w = [t for t, k in zip(step_ms, step_kind) if k == "w"]
    if not w:
        w = [t for i, (t, k) in enumerate(zip(step_ms, step_kind)) if k != "h" and i > 0]
    out = {"hessian_step_ms": None, "normal_step_ms": None, "hessian_overhead_pct": None}
    if not h or not w:
        return out
    hm, wm = statistics.median(h), statistics.median(w)
    per = every if every > 0 else len(step_ms)
    out.update(hessian_step_ms=round(hm, 3), normal_step_ms=round(wm, 3),
               hessian_overhead_pct=round(100.0 * (hm - wm) / per / wm, 3))
    return out


# ----------------------------------------------------------------------------- state trees


def encode_tree(obj, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """Split a nested state (dicts with int/str keys, lists, tuples, tensors, scalars) into
    (named CPU tensors, a JSON-able structure) for pgolf.tensorfile; `decode_tree` inverts it.
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
    """Rebuild what `encode_tree` split; a missing tensor raises TrainError."""
    if "t" in node:
        if node["t"] not in tensors:
            raise TrainError(f"state tensor {node['t']!r} missing from the checkpoint")
        return tensors[node["t"]]
    if "d" in node:
        return {k: decode_tree(tensors, v) for k, v in node["d"]}
    if "l" in node:
        return [decode_tree(tensors, v) for v in node["l"]]
    if "u" in node:
        return tuple(decode_tree(tensors, v) for v in node["u"])
    return node["v"]


# ----------------------------------------------------------------------------- averages


class WeightAverages:
    """EMA of every parameter (fp32, after each optimizer step) and the SWA running sum.

    SWA averages the live training weights (not the EMA) at the snapshot steps; `final()` is that
    average when a snapshot was taken, else the EMA.
    """

    def __init__(self, model: torch.nn.Module, decay: float, cfg: TrainConfig):
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.decay = float(decay)
        self.swa_enabled, self.swa_every, self.swa_threshold = cfg.swa_enabled, cfg.swa_every, cfg.swa_threshold
        self.ema = [p.detach().float().clone() for p in self.params]
        self.swa_sum: list[Tensor] | None = None
        self.swa_count = 0
        self.swa_first_step: int | None = None

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay*ema + (1-decay)*w, as one foreach lerp."""
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def maybe_snapshot(self, step: int, scale: float) -> bool:
        """Add the live weights to the SWA sum when SWA is on, scale < threshold, step % every == 0."""
        if not (self.swa_enabled and scale < self.swa_threshold and step % self.swa_every == 0):
            return False
        if self.swa_sum is None:
            self.swa_sum = [torch.zeros_like(e) for e in self.ema]
            self.swa_first_step = step
        torch._foreach_add_(self.swa_sum, [p.detach().float() for p in self.params])
        self.swa_count += 1
        return True

    @property
    def source(self) -> str:
        return "swa" if self.swa_count > 0 else "ema"

    def final(self) -> dict[str, Tensor]:
        """The exported weights by parameter name: the SWA mean if any snapshot, else the EMA."""
        if self.swa_count > 0:
            return {n: s / self.swa_count for n, s in zip(self.names, self.swa_sum)}
        return dict(zip(self.names, self.ema))

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"ema/{n}": e for n, e in zip(self.names, self.ema)}
        if self.swa_sum is not None:
            out.update({f"swa/{n}": s for n, s in zip(self.names, self.swa_sum)})
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict) -> None:
        for n, e in zip(self.names, self.ema):
            e.copy_(tensors[f"ema/{n}"])
        self.swa_count = int(meta["swa_count"])
        self.swa_first_step = meta.get("swa_first_step")
        self.swa_sum = None
        if self.swa_count > 0:
            self.swa_sum = [tensors[f"swa/{n}"].to(e.device).clone() for n, e in zip(self.names, self.ema)]


# ----------------------------------------------------------------------------- run log


class RunLog:
    """The lines of train.log (also printed by rank 0) and the rows of plots/train.tsv."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.lines: list[str] = []
        self.rows: list[dict] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(msg)
        if self.is_main:
            print(msg, flush=True)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def tsv(self) -> str:
        out = ["\t".join(TSV_COLUMNS)]
        for r in self.rows:
            out.append(f"{r['step']}\t{r['train_loss']:.6f}\t{r['lr_scale']:.6f}\t{r['tokens_per_second']:.1f}")
        return "\n".join(out) + "\n"


class Clock:
    """Training time in ms: runs only between `start()` and `pause()`."""

    def __init__(self, base_ms: float = 0.0):
        self.base_ms = base_ms
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def pause(self) -> None:
        if self._t0 is not None:
            self.base_ms += (time.perf_counter() - self._t0) * 1000.0
            self._t0 = None

    def ms(self) -> float:
        extra = (time.perf_counter() - self._t0) * 1000.0 if self._t0 is not None else 0.0
        return self.base_ms + extra


class StepTimer:
    """Per-step durations (ms) without a device synchronisation per step.

    On CUDA each step is bracketed by two events recorded on the stream; their durations are read
    only when `ms` is asked for (a log line, a checkpoint, the end), so the host can queue the next
    step while the device still runs this one. On CPU the host clock is exact.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._done: list[float] = []
        self._pending: list[tuple] = []
        self._start = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self._done.append(round((time.perf_counter() - self._start) * 1000.0, 4))

    @property
    def ms(self) -> list[float]:
        for start, end in self._pending:
            end.synchronize()
            self._done.append(round(start.elapsed_time(end), 4))
        self._pending = []
        return self._done

    def load(self, ms: list[float]) -> None:
        self._done, self._pending = list(ms), []


# ----------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    train_shards: list[Path]
    val_tokens: np.ndarray
    tables: object  # ByteTables
    tokenizer: dict  # tokenizer.json
    data_id: dict  # what the checkpoint fingerprint records about the data


def check_inputs(paths: Paths, mcfg: ModelConfig, cfg: TrainConfig) -> Inputs:
    """Shards, tokenizer metadata and byte tables present and consistent with model.vocab_size."""
    train = list_shards(paths.shards, "train")
    sizes = [read_shard_header(p) for p in train]
    if sum(sizes) <= cfg.batch_tokens:
        raise TrainError(f"{paths.shards}: {sum(sizes)} training tokens, fewer than one batch "
                         f"(train.batch_tokens = {cfg.batch_tokens})")
    try:
        meta = read_tokenizer_meta(paths.tokenizer)
    except ValueError as e:
        raise TrainError(str(e)) from None
    meta_path = Path(paths.tokenizer) / "tokenizer.json"
    if int(meta["vocab_size"]) != mcfg.vocab_size:
        raise TrainError(f"model.vocab_size is {mcfg.vocab_size} but {meta_path} says the tokenizer has "
                         f"{meta['vocab_size']} tokens; set model.vocab_size to {meta['vocab_size']}")
    tables = load_byte_tables(paths.tokenizer)
    if tables.vocab_size != mcfg.vocab_size:
        raise TrainError(f"{Path(paths.tokenizer) / 'byte_tables.pgt'}: byte tables cover {tables.vocab_size} "
                         f"tokens, model.vocab_size is {mcfg.vocab_size}")
    for shard in train:  # every shard, before step 1 (a bad id would otherwise fail at its step)
        top = max_token_id(shard)
        if top >= mcfg.vocab_size:
            raise TrainError(f"{shard}: token id {top} >= model.vocab_size {mcfg.vocab_size}")
    from pgolf.bpb import load_val_tokens

    try:
        val = load_val_tokens(paths.shards, cfg.val_tokens)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if len(val) < cfg.seq_len + 1:
        raise TrainError(f"{paths.shards}: {len(val)} validation tokens, fewer than one sequence of "
                         f"train.seq_len + 1 = {cfg.seq_len + 1} (check train.val_tokens)")
    if int(val.max()) >= mcfg.vocab_size:
        raise TrainError(f"{paths.shards}: validation token id {int(val.max())} >= model.vocab_size {mcfg.vocab_size}")
    data_id = {"train_shards": [[p.name, n] for p, n in zip(train, sizes)], "tokenizer_sha256": meta["sha256"]}
    return Inputs(train, val, tables, meta, data_id)


# ----------------------------------------------------------------------------- checkpoints


def fingerprint(mcfg: ModelConfig, cfg: TrainConfig, world_size: int, data_id: dict) -> dict:
    """What must match for a checkpoint to be resumed: model + train params (minus the log and
    checkpoint knobs), world size, the training shards (names, sizes) and the tokenizer."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FINGERPRINT_EXCLUDE}
    return {"version": CHECKPOINT_VERSION, "model": dataclasses.asdict(mcfg), "train": train,
            "world_size": world_size, "data": data_id}


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def checkpoint_path(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint_dir) / CHECKPOINT_FILE


def read_checkpoint(path: Path, expected: dict) -> tuple[dict[str, Tensor] | None, dict | None, str]:
    """(tensors, meta, why) -> tensors None when there is nothing usable (`why` says why)."""
    if not path.is_file():
        return None, None, "no checkpoint"
    try:
        tensors, header = tensorfile.load(path, kind=CHECKPOINT_KIND)
    except tensorfile.TensorFileError as e:
        return None, None, f"checkpoint unreadable ({e})"
    meta = header["meta"]
    diff = _diff(meta.get("fingerprint"), expected)
    if diff:
        shown = "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")
        return None, None, f"checkpoint {path} is for another configuration ({shown})"
    return tensors, meta, "ok"


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One run: builds model, optimizers, loader, averages and Hessian buffers; see module doc."""

    def __init__(self, mcfg: ModelConfig, cfg: TrainConfig, paths: Paths, info: dist.DistInfo, inputs: Inputs):
        self.mcfg, self.cfg, self.paths, self.info, self.inputs = mcfg, cfg, paths, info, inputs
        self.dev = info.device
        self.cuda = self.dev.type == "cuda"
        self.accum = resolve_grad_accum(cfg, info.world_size)
        self.local_tokens = check_batch(cfg, info.world_size, self.accum)  # tokens of one micro-batch per rank
        self.log = RunLog(info.is_main)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.model = GPT(mcfg, qat_quantile=cfg.qat_clip_quantile, train_seq_len=cfg.seq_len).to(self.dev)
        self.compiled = self.cuda and cfg.compile
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            self.model.use_fused_mlp = cfg.fused_mlp
        self.fwd = torch.compile(self.model, dynamic=False, fullgraph=True) if self.compiled else self.model
        self.opt = build_optimizers(self.model.optimizer_groups(), cfg, info)
        self.avg = WeightAverages(self.model, cfg.ema_decay, cfg)
        self.hess = hessian.HessianAccumulator(self.model.hessian_shapes(), cfg.hessian_every,
                                               cfg.hessian_start_scale, self.dev)
        self.loader = self._new_loader()
        self.fp = fingerprint(mcfg, cfg, info.world_size, inputs.data_id)
        self.step = 0
        self.clock = Clock()
        self.elapsed_ms = 0.0
        self.stopped_by = "iterations"
        self.qat_start_step: int | None = None
        if mcfg.num_loops > 0 and cfg.loop_enable_frac > 0:
            self.model.set_looping(False)  # depth recurrence starts at train.loop_enable_frac
        self.loop_start_step: int | None = 0 if self.model.looping else None
        self.seq_schedule = parse_seq_len_schedule(cfg)
        self.seq_len = seq_len_at(0.0, cfg, self.seq_schedule)  # this step's training sequence length
        self.timer = StepTimer(self.cuda)  # per-step device time, for the Hessian overhead
        self.step_kind: list[str] = []  # "h" Hessian step, "w" normal step inside the Hessian window, "n" other
        self.resumed_from = 0
        self.checkpoint_status = "no checkpoint"
        self.warmup_seconds = 0.0
        self._loader_state: dict | None = None  # set by a resume, applied after the warmup

    # -- helpers

    def _new_loader(self) -> DistributedTokenLoader:
        return DistributedTokenLoader(self.inputs.train_shards, self.info.rank, self.info.world_size, self.dev)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def _shared_max(self, value: float) -> float:
        """MAX over ranks (every rank then takes the same schedule decisions)."""
        if not self.info.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.dev)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return float(t.item())

    def _mean_over_ranks(self, t: Tensor) -> float:
        t = t.detach().float().reshape(1).clone()
        if self.info.enabled:
            tdist.all_reduce(t)
            t /= self.info.world_size
        return float(t.item())

    # -- one optimizer step

    def _step(self, step: int, scale: float, hessians: dict[str, Tensor] | None, ema: bool = True) -> Tensor:
        """Forward/backward over the micro-batches, clip, optimizer step, EMA -> mean loss (device)."""
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.dev)
        with self.model.qat_weights():  # late QAT: the banks hold Q(w) until the update
            for micro in range(self.accum):
                with record_function("pgolf.data"):
                    x, y = self.loader.next_batch(self.cfg.batch_tokens, self.seq_len, self.accum)  # (B, T)
                capture = hessians if micro == 0 else None
                if capture is not None and self.compiled:  # keep the compiled graph capture-free
                    self._capture_hessians(x, y, capture)
                    capture = None
                with record_function("pgolf.fwd"), self._autocast():
                    loss = self.fwd(x, y, hessians=capture)  # eager: captured in the training forward
                with record_function("pgolf.bwd"):
                    (loss / self.accum).backward()
                total += loss.detach()
        with record_function("pgolf.optimizer"):
            if self.cfg.grad_clip > 0:
                self.opt.clip_grad_norm_(self.cfg.grad_clip)
            self.opt.step(scale, muon_momentum_at(step, self.cfg))
            self.opt.zero_grad(set_to_none=True)
        if ema:
            with record_function("pgolf.ema"):
                self.avg.update_ema()
        return total / self.accum

    @torch.no_grad()
    def _capture_hessians(self, x: Tensor, y: Tensor, hessians: dict[str, Tensor]) -> None:
        """Compiled training only: add x^T x of this micro-batch's inputs to every quantizable
        matrix into `hessians` with one extra no-grad forward of the uncompiled model (the same
        weights the step's forward sees), so no second graph is ever compiled. (An eager forward
        captures inside the training forward itself, at no extra cost.)"""
        with record_function("pgolf.hessian"), self._autocast():
            self.model(x, y, hessians=hessians)

    # -- resume

    def resume_or_fresh(self) -> None:
        """Load a matching checkpoint (every rank agrees) or start fresh; log which and why."""
        path = checkpoint_path(self.cfg)
        tensors, meta, why = read_checkpoint(path, self.fp)
        ok = tensors is not None and self._checkpoint_complete(tensors, meta)
        if tensors is not None and not ok:
            why = f"checkpoint {path} is incomplete (tensors missing or mis-shaped)"
        if self.info.enabled:
            flag = torch.tensor([1.0 if ok else 0.0], device=self.dev)
            tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
            if ok and flag.item() == 0:
                ok, why = False, "checkpoint not readable on every rank"
        if not ok:
            self.checkpoint_status = why
            if why != "no checkpoint":
                self.log(f"resume: {why}; starting fresh")
            return
        try:
            self._apply_checkpoint(tensors, meta)
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainError(f"{path}: checkpoint could not be applied ({e}); delete it to start fresh") from None
        self.checkpoint_status = "resumed"
        self.resumed_from = self.step
        self.log(f"resume: from {path} at step {self.step} ({self.elapsed_ms / 1000:.1f} s of training)")

    def _checkpoint_complete(self, tensors: dict[str, Tensor], meta: dict) -> bool:
        want = {f"model/{n}": p.shape for n, p in self.model.named_parameters()}
        want.update({f"ema/{n}": p.shape for n, p in self.model.named_parameters()})
        if int(meta.get("swa_count", 0)) > 0:
            want.update({f"swa/{n}": p.shape for n, p in self.model.named_parameters()})
        if self.info.rank == 0:
            want.update({f"hess/{n}": (k, k) for n, k in self.model.hessian_shapes().items()})
        return all(n in tensors and tuple(tensors[n].shape) == tuple(s) for n, s in want.items())

    @torch.no_grad()
    def _apply_checkpoint(self, tensors: dict[str, Tensor], meta: dict) -> None:
        for n, p in self.model.named_parameters():
            p.copy_(tensors[f"model/{n}"])
        self.avg.load_state_tensors(tensors, meta)
        self.opt.load_state_dict(decode_tree(tensors, meta["optimizer"]))
        hess = {n[len("hess/"):]: t for n, t in tensors.items() if n.startswith("hess/")}
        self.hess.load_state_tensors(hess, meta["hessian"], self.info.rank)
        if "rng/torch_cpu" in tensors:
            torch.set_rng_state(tensors["rng/torch_cpu"])
        self.step = int(meta["step"])
        self.elapsed_ms = float(meta["elapsed_ms"])
        self.clock = Clock(self.elapsed_ms)
        self.qat_start_step = meta["qat_start_step"]
        self.loop_start_step = meta["loop_start_step"]
        self.model.set_looping(self.loop_start_step is not None)
        if meta["qat_on"]:
            self.model.set_qat(True)
        self.timer.load(meta["step_ms"])
        self.step_kind = list(meta["step_kind"])
        self.log.lines = list(meta["log_lines"])
        self.log.rows = list(meta["rows"])
        self._loader_state = meta["loader"]

    def save_checkpoint(self) -> None:
        """One tensorfile (atomic rename): model, EMA/SWA, optimizer tree, Hessian sums (cross-rank
        sum, held by rank 0), torch CPU RNG; meta: step, elapsed, QAT, loader, log, timings.
        Collective when distributed; rank 0 writes."""
        tensors = {f"model/{n}": p.detach().cpu() for n, p in self.model.named_parameters()}
        tensors.update({k: v.detach().cpu() for k, v in self.avg.state_tensors().items()})
        opt_tensors, opt_tree = encode_tree(self.opt.state_dict(), "opt")
        tensors.update(opt_tensors)
        hess_tensors, hess_meta = self.hess.state_tensors(self.info.rank)
        tensors.update({f"hess/{n}": t for n, t in hess_tensors.items()})
        tensors["rng/torch_cpu"] = torch.get_rng_state()
        if not self.info.is_main:
            return
        meta = {"fingerprint": self.fp, "step": self.step, "elapsed_ms": self.elapsed_ms,
                "qat_on": self.model.qat_on, "qat_start_step": self.qat_start_step,
                "loop_start_step": self.loop_start_step,
                "swa_count": self.avg.swa_count, "swa_first_step": self.avg.swa_first_step,
                "hessian": hess_meta, "optimizer": opt_tree, "loader": self.loader.state_dict(),
                "step_ms": self.step_ms, "step_kind": self.step_kind,
                "log_lines": self.log.lines, "rows": self.log.rows}
        tensorfile.save(checkpoint_path(self.cfg), tensors, kind=CHECKPOINT_KIND, meta=meta)

    # -- compile priming

    def warmup(self) -> None:
        """`warmup_steps` real steps to compile the graphs (the last one with a Hessian capture),
        then restore the model and optimizer state and re-create the loader (§4.5)."""
        n = self.cfg.warmup_steps
        if n > 0:
            t0 = time.perf_counter()
            model_state = {k: p.detach().clone() for k, p in self.model.named_parameters()}
            opt_state = self.opt.state_dict()
            scratch = self.model.zero_hessians()
            looping, seq_len = self.model.looping, self.seq_len
            lengths = sorted({self.cfg.seq_len} | {length for length, _ in self.seq_schedule})
            for mode in ([False, True] if self.mcfg.num_loops > 0 and not looping else [looping]):
                self.model.set_looping(mode)  # prime the looped graph too when it comes later
                for length in lengths:  # and one graph per training sequence length
                    self.seq_len = length
                    for i in range(n):
                        self._step(self.step, 1.0, scratch if (i == n - 1 and n > 1) else None, ema=False)
            self.model.set_looping(looping)
            self.seq_len = seq_len
            self._sync()
            with torch.no_grad():
                for k, p in self.model.named_parameters():
                    p.copy_(model_state[k])
            self.opt.load_state_dict(opt_state)
            self.opt.zero_grad(set_to_none=True)
            del model_state, opt_state, scratch
            self.warmup_seconds = time.perf_counter() - t0
            self.log(f"warmup: {n} compile-priming steps in {self.warmup_seconds:.1f} s; state restored")
        self.loader = self._new_loader()
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)

    # -- the loop

    def _force_hessian(self) -> bool:
        """The last chance to capture a Hessian: the last iteration, or the next step would
        reach the wallclock cap (estimated from the mean step time)."""
        if self.step == self.cfg.iterations - 1:
            return True
        cap_ms = self.cfg.max_wallclock_seconds * 1000.0
        return cap_ms > 0 and self.step > 0 and self.elapsed_ms + 1.5 * self.elapsed_ms / self.step >= cap_ms

    def train(self, on_step: Callable[["Trainer"], None] | None = None) -> None:
        cfg = self.cfg
        cap_ms = cfg.max_wallclock_seconds * 1000.0
        if self.resumed_from == 0:
            self.log(f"train: {self.model.num_params():,} params, world {self.info.world_size}, grad_accum "
                     f"{self.accum}, {cfg.batch_tokens:,} tokens/step, device {self.dev}, "
                     f"compile {self.compiled}, exported weights: "
                     f"{'swa' if cfg.swa_enabled else 'ema'}")
        self.clock.start()
        while self.step < cfg.iterations:
            step = self.step
            scale = lr_scale(step, self.elapsed_ms, cfg)
            if cfg.late_qat_threshold > 0 and self.qat_start_step is None and scale < cfg.late_qat_threshold:
                self.model.set_qat(True)
                self.qat_start_step = step
                self.log(f"late_qat: enabled at step {step} (lr scale {scale:.4f})")
            self._maybe_start_loops(step)
            self._set_seq_len(step)
            capture = self.hess.due(step, scale, force=self._force_hessian())
            self.timer.start()
            lr = lr_multiplier(scale, cfg)  # the schedule's triggers above read the unfloored scale
            loss = self._step(step, lr, self.hess.sums if capture else None)
            if capture:
                self.hess.record(self.local_tokens)
            self.timer.stop()  # no sync: the host queues the next step while the device works
            self.step_kind.append("h" if capture else ("w" if scale < cfg.hessian_start_scale else "n"))
            self.step += 1
            self.elapsed_ms = self._shared_max(self.clock.ms())
            if self.avg.maybe_snapshot(self.step, scale) and self.avg.swa_count == 1:
                self.log(f"swa: first snapshot at step {self.step} (lr scale {scale:.4f})")
            if cap_ms > 0 and self.elapsed_ms >= cap_ms and self.step < cfg.iterations:
                self.stopped_by = "wallclock"
            last = self.step == cfg.iterations or self.stopped_by == "wallclock"
            if self.step == 1 or last or (cfg.log_every > 0 and self.step % cfg.log_every == 0):
                self._log_step(loss, lr)
            if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0 and not last:
                self._sync()
                self.clock.pause()
                self._check_finite(self._mean_over_ranks(loss))  # never overwrite a good checkpoint with NaNs
                self.save_checkpoint()
                self.clock.start()
            if on_step is not None:
                on_step(self)
            if last:
                break
        self._sync()  # the training time includes the device finishing the queued work
        self.clock.pause()
        self.elapsed_ms = self._shared_max(self.clock.ms())
        self.model.set_looping(True)  # evaluated as the evaluate stage rebuilds it: looping when configured

    def _set_seq_len(self, step: int) -> None:
        """Follow train.seq_len_schedule (a no-op without one); log each change."""
        n = seq_len_at(training_frac(step, self.elapsed_ms, self.cfg), self.cfg, self.seq_schedule)
        if n != self.seq_len:
            self.log(f"seq_len: {n} from step {step}")
        self.seq_len = n

    def _maybe_start_loops(self, step: int) -> None:
        """Switch depth recurrence on once training_frac reaches train.loop_enable_frac."""
        if self.model.looping or self.mcfg.num_loops == 0:
            return
        frac = training_frac(step, self.elapsed_ms, self.cfg)
        if frac >= self.cfg.loop_enable_frac:
            self.model.set_looping(True)
            self.loop_start_step = step
            self.log(f"depth_recurrence: enabled at step {step} (frac {frac:.3f}), layers "
                     f"{layer_order(self.mcfg)}")

    def _check_finite(self, loss_v: float) -> None:
        """Stop on a NaN/inf loss; the last checkpoint written (a finite state) is kept."""
        if not math.isfinite(loss_v):
            kept = checkpoint_path(self.cfg)
            kept = f"; the last good checkpoint {kept} is kept" if kept.is_file() else ""
            raise TrainError(f"training diverged at step {self.step}: loss {loss_v} (try lower train.*_lr){kept}")

    def _log_step(self, loss: Tensor, scale: float) -> None:
        cfg = self.cfg
        loss_v = self._mean_over_ranks(loss)
        self._check_finite(loss_v)
        step_avg = self.elapsed_ms / self.step
        tps = cfg.batch_tokens * self.step / max(self.elapsed_ms / 1000.0, 1e-9)
        eta = (cfg.iterations - self.step) * step_avg / 1000.0
        if cfg.max_wallclock_seconds > 0:
            eta = min(eta, max(cfg.max_wallclock_seconds - self.elapsed_ms / 1000.0, 0.0))
        self.log(f"step:{self.step}/{cfg.iterations} train_loss:{loss_v:.4f} lr_scale:{scale:.4f} "
                 f"tok/s:{tps:,.0f} step_avg:{step_avg:.1f}ms train_time:{self.elapsed_ms / 1000:.1f}s eta:{eta:.0f}s")
        self.log.rows.append({"step": self.step, "train_loss": loss_v, "lr_scale": scale, "tokens_per_second": tps})

    # -- the end

    def hessian_overhead(self) -> dict:
        return hessian_overhead(self.step_ms, self.step_kind, self.cfg.hessian_every)

    @property
    def step_ms(self) -> list[float]:
        return self.timer.ms

    @torch.no_grad()
    def _fallback_hessian(self) -> None:
        """Only when no step captured one (cannot happen on the step-based schedule): one
        no-grad forward of the next training micro-batch with capture, after the clock stopped."""
        x, y = self.loader.next_batch(self.cfg.batch_tokens, self.cfg.seq_len, self.accum)
        with self._autocast():
            self.model(x, y, hessians=self.hess.sums)
        self.hess.record(x.numel())
        self.log("hessian: no step captured one; took one extra micro-batch after training")

    def finish(self) -> TrainResult:
        """Hessians (cross-rank), exported weights into the model, val_bpb_float, metrics."""
        from pgolf.bpb import eval_nonsliding

        cfg = self.cfg
        if self.hess.accumulations == 0:
            self._fallback_hessian()
        hess, hmeta = self.hess.finalize()
        hessian.validate(hess, self.model.hessian_shapes(), "online Hessians")
        final = self.avg.final()
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(final[n])
        self.model.set_qat(False)  # val_bpb_float scores the float weights as exported
        t0 = time.perf_counter()
        ev = eval_nonsliding(self.model, self.inputs.val_tokens, self.inputs.tables, cfg.seq_len,
                             cfg.val_batch_seqs, self.dev, self.info.rank, self.info.world_size,
                             autocast=self.cuda, compile=self.cuda and cfg.compile)
        eval_s = time.perf_counter() - t0
        export = {n: t.detach().float().cpu().contiguous() for n, t in self.model.export_state_dict().items()}
        m = self._metrics(ev, hmeta, eval_s)
        self.log(f"final: {self.step} steps in {m['train_seconds']:.1f} s ({m['tokens_per_second']:,.0f} tok/s), "
                 f"stopped by {self.stopped_by}; exported {self.avg.source} weights; val_loss_float "
                 f"{ev['val_loss']:.4f} val_bpb_float {ev['val_bpb']:.4f} over {ev['tokens']:,} tokens "
                 f"({eval_s:.1f} s); Hessians: {hmeta['accumulations']} accumulations, {hmeta['rows']:,} rows, "
                 f"overhead {m['hessian_overhead_pct']}% of step time")
        return TrainResult(m, export, hess, hmeta, self.log.text(), list(self.log.rows))

    def _metrics(self, ev: dict, hmeta: dict, eval_s: float) -> dict:
        cfg = self.cfg
        secs = self.elapsed_ms / 1000.0
        if self.cuda:
            peak, peak_kind = torch.cuda.max_memory_allocated(self.dev) / 2**20, "cuda_max_allocated"
        else:
            import resource

            peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
        try:
            import triton

            triton_v = triton.__version__
        except Exception:  # noqa: BLE001 - optional
            triton_v = None
        return {
            "steps": self.step,
            "train_seconds": round(secs, 3),
            "tokens_per_second": round(cfg.batch_tokens * self.step / max(secs, 1e-9), 1),
            "world_size": self.info.world_size,
            "val_bpb_float": ev["val_bpb"],
            "peak_memory_mb": round(peak, 1),
            "peak_memory_kind": peak_kind,
            "val_loss_float": ev["val_loss"],
            "val_tokens_scored": ev["tokens"],
            "eval_seconds": round(eval_s, 3),
            **self.hessian_overhead(),
            "hessian_accumulations": hmeta["accumulations"],
            "hessian_rows": hmeta["rows"],
            "qat_start_step": self.qat_start_step,
            "loop_start_step": self.loop_start_step,
            "swa_snapshots": self.avg.swa_count,
            "swa_start_step": self.avg.swa_first_step,
            "exported_weights": self.avg.source,
            "stopped_by": self.stopped_by,
            "step_avg_ms": round(self.elapsed_ms / max(self.step, 1), 3),
            "grad_accum_steps": self.accum,
            "batch_tokens": cfg.batch_tokens,
            "seq_len": cfg.seq_len,
            "model_params": self.model.num_params(),
            "warmup_seconds": round(self.warmup_seconds, 3),
            "resumed_from_step": self.resumed_from,
            "checkpoint": self.checkpoint_status,
            "device": torch.cuda.get_device_name(self.dev) if self.cuda else (platform.processor() or "cpu"),
            "versions": {"torch": torch.__version__, "triton": triton_v, "python": platform.python_version()},
            "config": {"model": dataclasses.asdict(self.mcfg), "train": dataclasses.asdict(cfg)},
        }


# ----------------------------------------------------------------------------- outputs


def model_meta(mcfg: ModelConfig, cfg: TrainConfig, tokenizer_meta: dict) -> dict:
    """The model.pgt meta of the contract."""
    return {"model": dataclasses.asdict(mcfg), "train_seq_len": cfg.seq_len,
            "qat_quantile": cfg.qat_clip_quantile, "qat_bits": QAT_BITS,
            "tokenizer": {"sha256": tokenizer_meta["sha256"], "vocab_size": int(tokenizer_meta["vocab_size"])}}


def write_outputs(result: TrainResult, mcfg: ModelConfig, cfg: TrainConfig, paths: Paths,
                  tokenizer_meta: dict) -> None:
    """artifacts/train/ in one staged swap, then metrics/train.json and plots/train.tsv."""
    with staged_dir(paths.out_dir) as tmp:
        tensorfile.save(tmp / "model.pgt", result.export, kind="float_weights",
                        meta=model_meta(mcfg, cfg, tokenizer_meta))
        hessian.save(tmp / "hessians.pgt", result.hessians, result.hessian_meta)
        atomic_write_text(tmp / "train.log", result.log_text)
    write_json(paths.metrics, result.metrics)
    log = RunLog(False)
    log.rows = result.rows
    atomic_write_text(paths.plots, log.tsv())


def run(mcfg: ModelConfig, cfg: TrainConfig, paths: Paths | None = None,
        on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
    """Validate, train (resuming from a matching checkpoint), write the outputs (rank 0),
    delete the checkpoint. `on_step(trainer)` runs after every completed step (trainer.step
    steps done, checkpoint already written): tests use it to observe or to simulate a crash."""
    paths = paths or Paths()
    validate(cfg, mcfg)
    info = dist.init(cfg.device)
    check_batch(cfg, info.world_size, resolve_grad_accum(cfg, info.world_size))
    inputs = check_inputs(paths, mcfg, cfg)
    trainer = Trainer(mcfg, cfg, paths, info, inputs)
    trainer.resume_or_fresh()
    trainer.warmup()
    trainer.train(on_step)
    result = trainer.finish()
    if info.is_main:
        write_outputs(result, mcfg, cfg, paths, inputs.tokenizer)
        checkpoint_path(cfg).unlink(missing_ok=True)
    if info.enabled:
        tdist.barrier()
    return result

