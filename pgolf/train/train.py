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
  (pgolf.train.optim), then the EMA update. Nothing in a step waits for the device: step times come
  from CUDA events read lazily (`StepTimer`), the wallclock from the host clock (bounded ahead of
  the device by the launch queue; the clock stops only after a final synchronisation). The
  elapsed time is all-reduced (MAX) after every step, so every rank computes the same lr scale
  and stops on the same step when the wallclock cap is reached.
* compile priming (§4.5): real steps per graph (the second with a Hessian capture) until one,
  from the second on, compiles nothing (`compiles_so_far`), at most `warmup_steps`; then the
  model, optimizer state and loader are restored.
* sequence-length schedule (`seq_len_schedule`): shorter sequences (same tokens per step) until
  given training fractions, then `seq_len`; compile priming runs every length.
* depth recurrence (`model.num_loops`): off until `training_frac` reaches `loop_enable_frac`
  (compile priming runs both graphs), on for the final evaluation and in the export.
* late QAT: `model.set_qat(True)` the first time the scale drops below `late_qat_threshold`;
  each step's forwards/backwards then run inside `model.qat_weights()` (Q(w) swapped into the
  banks, straight-through gradients), so the compiled graph never changes.
* online Hessians (pgolf.train.hessian): its `HessianSchedule` says which steps capture (and labels
  every step for the overhead metrics); on a capture step, the step's first micro-batch feeds them:
  inside its training forward when the model runs eagerly (CPU), or, when that forward is
  compiled, through one extra no-grad forward of the uncompiled model with the same weights (so
  only one graph is ever compiled).
* weight averages (pgolf.train.averages): the EMA (fp32, every step) of all parameters; SWA, when
  enabled, averages the *live* training weights (not the EMA) at every step s with
  s % swa_every == 0 whose lr scale was < swa_threshold. The exported weights are the SWA
  average if at least one snapshot was taken, else the EMA.
* resumable checkpoints (pgolf.train.checkpoint, which owns the file): every `checkpoint_every` steps
  the whole training state is saved; a run whose fingerprint matches resumes from it
  bit-exactly; it is deleted after a successful run.
* outputs (rank 0): artifacts/train/{model.pgt, hessians.pgt, train.log} through one staged
  folder, metrics/train.json, plots/train.tsv.
"""

from __future__ import annotations

import math
import platform
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

from pgolf.shared import dist, layout, train_files
from pgolf.train import checkpoint, hessian
from pgolf.train.averages import WeightAverages
from pgolf import config
from pgolf.config import ModelConfig, TrainConfig
from pgolf.shared.byte_tables import byte_tables_path, load_byte_tables
from pgolf.train.loader import DistributedTokenLoader
from pgolf.shared.shards import list_shards, max_token_id, read_shard, read_shard_header
from pgolf.shared.tokenizer_meta import read_tokenizer_meta, tokenizer_meta_path
from pgolf.shared.io import atomic_write_text, staged_dir, write_json
from pgolf.shared.model import GPT, QAT_BITS, layer_order
from pgolf.train.optim import build_optimizers
from pgolf.train.schedule import lr_multiplier, lr_scale, muon_momentum_at, seq_len_at, training_frac
from pgolf.train.timing import Clock, StepTimer

TSV_COLUMNS = ("step", "train_loss", "lr_scale", "tokens_per_second")



# Inductor options for the training graph. Mix-order reductions fuse each norm's row reduction
# with the column sums of the per-channel scales' gradients; on one H200 at 786,432 tokens/step
# that made kernels of 61 ms per step, which become one 6.4 ms column sum with the option off
# (bench/results/inductor_variants_h200.json; the speed claim is vs_ref_h200.json's ratio).
INDUCTOR_OPTIONS = {"triton.mix_order_reduction": False}

def compile_forward(model: GPT, scope: str, backend: str = "inductor") -> Callable:
    """The training forward `(x, y) -> loss` under torch.compile (`train.compile_scope`):

    * `model`: one graph of the whole forward and loss;
    * `blocks` (regional compilation): every Block compiled in place (its `forward`, and its
      `parallel` for two-lane layers), plus the loss head; the embeddings, the U-Net skips and
      the lane mixing between them run eagerly. Blocks with the same flags (XSA, value
      embedding, lanes) share one compiled graph, so a few block graphs are traced and built
      instead of the whole unrolled model. An uncompiled call of `model` (the Hessian capture)
      must run under `torch.compiler.set_stance("force_eager")`.
    """
    opts = {"dynamic": False, "fullgraph": True, "backend": backend}
    allow_custom_function_caching()
    if backend == "inductor":
        opts["options"] = INDUCTOR_OPTIONS
    if scope == "model":
        return torch.compile(model, **opts)
    # one compiled code object serves every block: a cache entry per flag combination, sequence
    # length and grad mode, more than dynamo's default of 8 with a sequence-length schedule
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.blocks:
        block.compile(**opts)
        block.parallel = torch.compile(block.parallel, **opts)
    model.loss_from_hidden = torch.compile(model.loss_from_hidden, **opts)
    return model


def use_cuda_training_kernels(model: GPT, cfg: TrainConfig) -> None:
    """What training turns on for a model on CUDA: TF32 matmuls and convolutions, and the fused
    Triton kernels that `train.fused_mlp` and `train.fused_qk_norm_rope` ask for (the benches
    that build the model as the trainer does call this too)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model.use_fused_mlp = cfg.fused_mlp
    model.use_fused_qk = cfg.fused_qk_norm_rope


def allow_custom_function_caching() -> None:
    """Let AOTAutograd's on-disk cache keep graphs that hold an autograd.Function (the fused MLP).

    By default such a graph bypasses that cache, so a warm rerun traced the joint forward+backward
    again: 19.1 s of a warm first step at 48 x 2048 on one H200, 11.1 s of it in AOTAutograd
    (bench/results/compile_h200_machine5.json); with the cache, 7.3 s on the next lent H200, the
    joint trace gone (compile_h200_machine6_aot_cache.json). Caching is sound here: dynamo traces the Function's
    forward and backward into the graph that keys the cache, and its kernels are opaque custom
    ops (pgolf::mlp_*), called at run time, not code baked into the cached artifact."""
    import torch._functorch.config as functorch_config

    functorch_config.autograd_cache_allow_custom_autograd_functions = True


def compiles_so_far() -> int:
    """Graphs torch.compile has built in this process: dynamo's new graphs plus inductor's
    compiled graphs (forward and backward, whether its on-disk cache held them or not)."""
    from torch._dynamo.utils import counters
    built = counters["inductor"]
    return counters["stats"]["unique_graphs"] + sum(
        built[k] for k in ("fxgraph_cache_miss", "fxgraph_cache_hit", "fxgraph_cache_bypass"))


class TrainError(ValueError):
    """Bad training input (data, tokenizer, checkpoint) or a diverged run; names the file/param."""


@dataclass(frozen=True)
class Paths:
    """Where the train stage reads and writes (dvc.yaml's deps/outs), relative to the cwd."""

    shards: Path = layout.SHARDS
    tokenizer: Path = layout.TOKENIZER
    out_dir: Path = layout.TRAIN
    metrics: Path = layout.TRAIN_METRICS
    plots: Path = layout.TRAIN_TSV


@dataclass
class TrainResult:
    metrics: dict
    export: dict[str, Tensor]  # the exported fp32 weights (GPT.export_state_dict names), CPU
    hessians: dict[str, Tensor]
    hessian_meta: dict
    log_text: str
    rows: list[dict] = field(default_factory=list)  # the plots/train.tsv rows


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


# ----------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    train_shards: list[Path]
    val_tokens: np.ndarray
    tables: object  # ByteTables
    tokenizer: dict  # tokenizer.json
    data_id: dict  # what the checkpoint fingerprint records about the data


def check_inputs(paths: Paths, mcfg: ModelConfig, cfg: TrainConfig) -> Inputs:
    """Shards, tokenizer metadata and byte tables present, every token id within model.vocab_size
    (the params against the data's metadata are the data_check gate's: pgolf.params.data_check)."""
    train = list_shards(paths.shards, "train")
    sizes = [read_shard_header(p) for p in train]
    try:
        meta = read_tokenizer_meta(paths.tokenizer)
    except ValueError as e:
        raise TrainError(str(e)) from None
    tables = load_byte_tables(paths.tokenizer)
    if tables.vocab_size != int(meta["vocab_size"]):
        raise TrainError(f"{byte_tables_path(paths.tokenizer)}: byte tables cover {tables.vocab_size} "
                         f"tokens, {tokenizer_meta_path(paths.tokenizer)} says {meta['vocab_size']}")
    for shard in train:  # every shard, before step 1 (a bad id would otherwise fail at its step)
        top = max_token_id(shard)
        if top >= mcfg.vocab_size:
            raise TrainError(f"{shard}: token id {top} >= model.vocab_size {mcfg.vocab_size}")
    from pgolf.shared.bpb import load_val_tokens

    val = load_val_tokens(paths.shards, cfg.val_tokens)
    if int(val.max()) >= mcfg.vocab_size:
        raise TrainError(f"{paths.shards}: validation token id {int(val.max())} >= model.vocab_size {mcfg.vocab_size}")
    data_id = {"train_shards": [[p.name, n] for p, n in zip(train, sizes)], "tokenizer_sha256": meta["sha256"]}
    return Inputs(train, val, tables, meta, data_id)


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One run: builds model, optimizers, loader, averages and Hessian buffers; see module doc."""

    def __init__(self, mcfg: ModelConfig, cfg: TrainConfig, paths: Paths, info: dist.DistInfo, inputs: Inputs):
        self.mcfg, self.cfg, self.paths, self.info, self.inputs = mcfg, cfg, paths, info, inputs
        self.dev = info.device
        self.cuda = self.dev.type == "cuda"
        self.split = cfg.batch_split(info.world_size)  # micro-batches per rank, tokens of one
        self.accum = self.split.accum
        self.log = RunLog(info.is_main)
        self.model, self.fwd = self._build_model()
        self.opt = build_optimizers(self.model.optimizer_groups(), cfg, info)
        self.avg = WeightAverages(self.model, cfg.ema_decay, cfg)
        self.hess = hessian.HessianAccumulator(self.model.hessian_shapes(), self.dev)
        self.hess_schedule = hessian.HessianSchedule(self.hess, cfg.hessian_every, cfg.hessian_start_scale,
                                                     cfg.iterations, cfg.max_wallclock_seconds)
        self.loader = self._new_loader()
        self.fp = checkpoint.fingerprint(mcfg, cfg, info.world_size, inputs.data_id)
        self.step = 0
        self.clock = Clock()
        self.elapsed_ms = 0.0
        self.stopped_by = "iterations"
        self.qat_start_step: int | None = None
        if mcfg.num_loops > 0 and cfg.loop_enable_frac > 0:
            self.model.set_looping(False)  # depth recurrence starts at train.loop_enable_frac
        self.loop_start_step: int | None = 0 if self.model.looping else None
        self.seq_len = seq_len_at(0.0, cfg)  # this step's training sequence length
        self.timer = StepTimer(self.cuda)  # per-step device time, for the Hessian overhead
        self.resumed_from = 0
        self.checkpoint_status = "no checkpoint"
        self.warmup_seconds = 0.0
        self.warmup_step_seconds: list[float] = []  # each priming step, graphs in priming order
        self._loader_state: dict | None = None  # set by a resume, applied after the warmup

    def _build_model(self) -> tuple[GPT, torch.nn.Module]:
        """The seeded model and the forward training calls (compiled on CUDA with train.compile)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = GPT(self.mcfg, qat_quantile=cfg.qat_clip_quantile, train_seq_len=cfg.seq_len).to(self.dev)
        self.compiled = self.cuda and cfg.compile
        if self.cuda:
            use_cuda_training_kernels(model, cfg)
        if not self.compiled:
            return model, model
        return model, compile_forward(model, cfg.compile_scope)

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
                    x, y = self.loader.next_batch(self.split.micro_tokens, self.seq_len)  # (B, T)
                capture = hessians if micro == 0 else None
                if capture is not None and self.compiled:  # keep the compiled graph capture-free
                    self._capture_hessians(x, capture)
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
    def _capture_hessians(self, x: Tensor, hessians: dict[str, Tensor]) -> None:
        """Compiled training (and the fallback after the clock): add x^T x of this micro-batch's
        inputs to every quantizable matrix into `hessians` with one extra no-grad forward of the
        uncompiled model (the weights the step's forward sees) up to the final norm (the tied
        head has no Hessian, so no logits or loss); no second graph is ever compiled. (An eager
        training step captures inside its training forward, at no extra cost.)"""
        with record_function("pgolf.hessian"), self._autocast(), torch.compiler.set_stance("force_eager"):
            self.model.forward_hidden(x, hessians)  # eager also where compile_scope compiled the blocks in place

    # -- resume

    def _parts(self) -> checkpoint.Parts:
        return checkpoint.Parts(self.model, self.opt, self.avg, self.hess, self.hess_schedule, self.timer, self.log)

    def resume_or_fresh(self) -> None:
        """Load a matching checkpoint (every rank agrees) or start fresh; log which and why."""
        path = checkpoint.checkpoint_path(self.cfg)
        tensors, meta, self.checkpoint_status = checkpoint.load(path, self.fp, self.model, self.info)
        if tensors is None:
            if self.checkpoint_status != "no checkpoint":
                self.log(f"resume: {self.checkpoint_status}; starting fresh")
            return
        try:
            progress = checkpoint.apply(tensors, meta, self._parts(), self.info.rank)
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainError(f"{path}: checkpoint could not be applied ({e}); delete it to start fresh") from None
        self.step, self.elapsed_ms, self.clock = progress.step, progress.elapsed_ms, Clock(progress.elapsed_ms)
        self.qat_start_step, self.loop_start_step = progress.qat_start_step, progress.loop_start_step
        self._loader_state = progress.loader
        self.checkpoint_status = "resumed"
        self.resumed_from = self.step
        self.log(f"resume: from {path} at step {self.step} ({self.elapsed_ms / 1000:.1f} s of training)")

    def save_checkpoint(self) -> None:
        """The whole training state into the checkpoint (pgolf.train.checkpoint); collective, rank 0 writes."""
        progress = checkpoint.Progress(self.step, self.elapsed_ms, self.qat_start_step, self.loop_start_step,
                                       self.loader.state_dict())
        checkpoint.save(checkpoint.checkpoint_path(self.cfg), self._parts(), self.fp, progress, self.info)

    # -- compile priming

    def warmup(self) -> None:
        """Compile priming: real steps until every graph is built (`_prime_graphs`), then restore
        the model and optimizer state and re-create the loader (§4.5)."""
        n = self.cfg.warmup_steps
        if n > 0:
            t0 = time.perf_counter()
            model_state = {k: p.detach().clone() for k, p in self.model.named_parameters()}
            opt_state = self.opt.state_dict()
            self._prime_graphs(n)
            with torch.no_grad():
                for k, p in self.model.named_parameters():
                    p.copy_(model_state[k])
            self.opt.load_state_dict(opt_state)
            self.opt.zero_grad(set_to_none=True)
            del model_state, opt_state
            self.warmup_seconds = time.perf_counter() - t0
            self.log(f"warmup: {len(self.warmup_step_seconds)} compile-priming steps in {self.warmup_seconds:.1f} s "
                     f"(per graph: until a step compiles nothing, at most {n}); state restored")
        self.loader = self._new_loader()
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)

    def _prime_graphs(self, n: int) -> None:
        """Priming steps (no EMA) for every graph training will run: each sequence length, looped
        and not."""
        scratch = self.model.zero_hessians()
        looping, seq_len = self.model.looping, self.seq_len
        lengths = sorted(set(self.cfg.seq_lens()))
        for mode in ([False, True] if self.mcfg.num_loops > 0 and not looping else [looping]):
            self.model.set_looping(mode)  # prime the looped graph too when it comes later
            for length in lengths:  # and one graph per training sequence length
                self.seq_len = length
                self._prime_graph(n, scratch)
        self.model.set_looping(looping)
        self.seq_len = seq_len  # (each priming step ended with a device synchronisation)

    def _prime_graph(self, n: int, scratch: dict[str, Tensor]) -> None:
        """At most `n` steps of the current graph; the second captures Hessians (its eager
        forward's kernels are built too). Stops after the first step from the second on that
        compiled nothing on any rank: the graphs are built, and more steps would only run them.
        Logs each step's seconds and graphs built (where compile time goes), and keeps the
        seconds in `warmup_step_seconds`."""
        seconds, built = [], []
        for i in range(n):
            t0, before = time.perf_counter(), compiles_so_far()
            self._step(self.step, 1.0, scratch if i == 1 else None, ema=False)
            self._sync()
            seconds.append(time.perf_counter() - t0)
            built.append(compiles_so_far() - before)
            if i >= 1 and self._shared_max(float(built[-1])) == 0:
                break
        self.log(f"warmup: seq_len {self.seq_len}{' looped' if self.model.looping else ''}: step seconds "
                 f"{', '.join(f'{t:.1f}' for t in seconds)}; graphs built {', '.join(map(str, built))}")
        self.warmup_step_seconds += [round(t, 2) for t in seconds]

    # -- the loop

    def train(self, on_step: Callable[["Trainer"], None] | None = None) -> None:
        if self.resumed_from == 0:
            self.log(f"train: {self.model.num_params():,} params, world {self.info.world_size}, grad_accum "
                     f"{self.accum}, {self.cfg.batch_tokens:,} tokens/step, device {self.dev}, "
                     f"compile {self.compiled}, exported weights: "
                     f"{'swa' if self.cfg.swa_enabled else 'ema'}")
        self.clock.start()
        while self.step < self.cfg.iterations:
            last = self._train_step()
            if on_step is not None:
                on_step(self)
            if last:
                break
        self._sync()  # the training time includes the device finishing the queued work
        self.clock.pause()
        self.elapsed_ms = self._shared_max(self.clock.ms())
        self.model.set_looping(True)  # evaluated as the evaluate stage rebuilds it: looping when configured

    def _train_step(self) -> bool:
        """One step of the loop with its schedule triggers, log line and checkpoint -> last step?"""
        cfg, step = self.cfg, self.step
        scale = lr_scale(step, self.elapsed_ms, cfg)
        self._maybe_start_qat(step, scale)
        self._maybe_start_loops(step)
        self._set_seq_len(step)
        capture = self.hess_schedule.due(step, scale, self.elapsed_ms)
        self.timer.start()
        lr = lr_multiplier(scale, cfg)  # the schedule's triggers above read the unfloored scale
        loss = self._step(step, lr, self.hess.sums if capture else None)
        if capture:
            self.hess.record(self.split.micro_tokens)
        self.timer.stop()  # no sync: the host queues the next step while the device works
        self.hess_schedule.label(capture, scale)
        self.step += 1
        self.elapsed_ms = self._shared_max(self.clock.ms())
        if self.avg.maybe_snapshot(self.step, scale) and self.avg.swa_count == 1:
            self.log(f"swa: first snapshot at step {self.step} (lr scale {scale:.4f})")
        cap_ms = cfg.max_wallclock_seconds * 1000.0
        if cap_ms > 0 and self.elapsed_ms >= cap_ms and self.step < cfg.iterations:
            self.stopped_by = "wallclock"
        last = self.step == cfg.iterations or self.stopped_by == "wallclock"
        if self.step == 1 or last or (cfg.log_every > 0 and self.step % cfg.log_every == 0):
            self._log_step(loss, lr)
        if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0 and not last:
            self._checkpoint(loss)
        return last

    def _maybe_start_qat(self, step: int, scale: float) -> None:
        """Late QAT: on the first step whose lr scale is below train.late_qat_threshold."""
        threshold = self.cfg.late_qat_threshold
        if threshold > 0 and self.qat_start_step is None and scale < threshold:
            self.model.set_qat(True)
            self.qat_start_step = step
            self.log(f"late_qat: enabled at step {step} (lr scale {scale:.4f})")

    def _checkpoint(self, loss: Tensor) -> None:
        """Save a checkpoint off the training clock, never over a good one with a NaN state."""
        self._sync()
        self.clock.pause()
        self._check_finite(self._mean_over_ranks(loss))
        self.save_checkpoint()
        self.clock.start()

    def _set_seq_len(self, step: int) -> None:
        """Follow train.seq_len_schedule (a no-op without one); log each change."""
        n = seq_len_at(training_frac(step, self.elapsed_ms, self.cfg), self.cfg)
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
            kept = checkpoint.checkpoint_path(self.cfg)
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
        return self.hess_schedule.overhead(self.step_ms)

    @property
    def step_ms(self) -> list[float]:
        return self.timer.ms

    @property
    def step_kind(self) -> list[str]:
        return self.hess_schedule.step_kind

    @torch.no_grad()
    def _fallback_hessian(self) -> None:
        """The schedule's fallback: one no-grad forward of the next training micro-batch with
        capture, after the clock stopped."""
        x, _ = self.loader.next_batch(self.split.micro_tokens, self.cfg.seq_len)  # (B, T)
        self._capture_hessians(x, self.hess.sums)
        self.hess.record(x.numel())
        self.log(hessian.FALLBACK_NOTE)

    def finish(self) -> TrainResult:
        """Hessians (cross-rank), exported weights into the model, val_bpb_float, metrics."""
        from pgolf.shared.bpb import eval_nonsliding

        cfg = self.cfg
        if self.hess_schedule.needs_fallback():
            self._fallback_hessian()
        hess, hmeta = self.hess.finalize()
        train_files.validate_hessians(hess, self.model.hessian_shapes(), "online Hessians")
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
            "warmup_steps_run": len(self.warmup_step_seconds),
            "warmup_step_seconds": self.warmup_step_seconds,
            "resumed_from_step": self.resumed_from,
            "checkpoint": self.checkpoint_status,
            "device": torch.cuda.get_device_name(self.dev) if self.cuda else (platform.processor() or "cpu"),
            "versions": {"torch": torch.__version__, "triton": triton_v, "python": platform.python_version()},
            "config": {"model": config.to_dict(self.mcfg), "train": config.to_dict(cfg)},
        }


# ----------------------------------------------------------------------------- outputs


def write_outputs(result: TrainResult, mcfg: ModelConfig, cfg: TrainConfig, paths: Paths,
                  tokenizer_meta: dict) -> None:
    """artifacts/train/ in one staged swap, then metrics/train.json and plots/train.tsv."""
    with staged_dir(paths.out_dir) as tmp:
        train_files.save_weights(tmp / train_files.MODEL_FILE, result.export, train_files.model_meta(
            mcfg, cfg.seq_len, cfg.qat_clip_quantile, QAT_BITS, tokenizer_meta))
        train_files.save_hessians(tmp / train_files.HESSIANS_FILE, result.hessians, result.hessian_meta)
        atomic_write_text(tmp / train_files.LOG_FILE, result.log_text)
    write_json(paths.metrics, result.metrics)
    log = RunLog(False)
    log.rows = result.rows
    atomic_write_text(paths.plots, log.tsv())


def run(mcfg: ModelConfig, cfg: TrainConfig, paths: Paths | None = None,
        on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
    """Train (resuming from a matching checkpoint), write the outputs (rank 0), delete the
    checkpoint; `mcfg` and `cfg` as pgolf.config loads them (range-checked there). `on_step(trainer)` runs after every completed step (trainer.step
    steps done, checkpoint already written): tests use it to observe or to simulate a crash."""
    paths = paths or Paths()
    info = dist.init(cfg.device)
    cfg.batch_split(info.world_size)  # ConfigError before any input is read, on a world other than nproc_per_node
    inputs = check_inputs(paths, mcfg, cfg)
    trainer = Trainer(mcfg, cfg, paths, info, inputs)
    trainer.resume_or_fresh()
    trainer.warmup()
    trainer.train(on_step)
    result = trainer.finish()
    if info.is_main:
        write_outputs(result, mcfg, cfg, paths, inputs.tokenizer)
        checkpoint.checkpoint_path(cfg).unlink(missing_ok=True)
    if info.enabled:
        tdist.barrier()
    return result

