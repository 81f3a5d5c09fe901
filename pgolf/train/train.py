"""The training loop of the record recipe (recipe-spec §4, §6.5): one run, from the checked `model`
and `train` params to the train stage's outputs.

This module owns the loop. `Trainer` builds the seeded model, Muon + AdamW (pgolf.train.optim),
the weight averages (averages), the Hessian buffers and their schedule (hessian) and the loader;
resumes from a matching checkpoint (checkpoint); primes the compiled graphs (priming); then runs
the steps. A step applies the schedule's triggers (triggers), runs the micro-batches of
`TrainConfig.batch_split` (bf16 autocast + torch.compile on CUDA, fp32 eager on the CPU), clips
by the grad norm (global, or per rank: train.grad_clip_scope), steps the optimizers with the lr
multiplier and Muon momentum of pgolf.train.schedule, updates the EMA, and may capture Hessians,
snapshot SWA, log and save a checkpoint. Nothing in a step waits for the device: step times come
from CUDA events read lazily (timing), the wallclock from the host clock, which stops only after a
final synchronisation; the elapsed time is all-reduced (MAX) after every step, so every rank
computes the same lr scale and stops on the same step. `run` ties a run together; its files are
pgolf.train.outputs'.

With train.doc_packing a micro-batch is one packed row of micro_tokens tokens whose attention stays
within documents (segments cut at every BOS and every seq_len tokens; pgolf.shared.docattn, kernel
train.doc_attn_backend); the float eval below scores such a model as it was trained, and as PR
#2135's script scores it: windows of seq_len, each batch of them one row with attention within
documents (pgolf.shared.bpb.row_segments).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor
from torch.profiler import record_function

from pgolf.config import ModelConfig, TrainConfig
from pgolf.shared import dist, train_files, val_bytes
from pgolf.shared.bpb import eval_nonsliding
from pgolf.shared.model import GPT
from pgolf.train import checkpoint, hessian
from pgolf.train.averages import WeightAverages
from pgolf.train.device import autocast, mean_over_ranks, shared_max, sync
from pgolf.train.inputs import Inputs, Paths, TrainError, check_inputs
from pgolf.train.loader import DistributedTokenLoader
from pgolf.train.optim import build_optimizers
from pgolf.train.outputs import Counters, RunLog, TrainResult, final_line, train_metrics, write_outputs
from pgolf.train.priming import Primer, Priming, compile_forward, use_cuda_training_kernels
from pgolf.train.schedule import lr_multiplier, lr_scale, muon_momentum_at
from pgolf.train.timing import Clock, StepTimer
from pgolf.train.triggers import Triggers

if TYPE_CHECKING:
    from pgolf.shared import docattn  # imported where train.doc_packing uses it (the packed script carries it only then)


class Trainer:
    """One run: model, optimizers, loader, averages, Hessian buffers and triggers; see the module doc."""

    def __init__(self, mcfg: ModelConfig, cfg: TrainConfig, paths: Paths, info: dist.DistInfo, inputs: Inputs):
        self.mcfg, self.cfg, self.paths, self.info, self.inputs = mcfg, cfg, paths, info, inputs
        self.dev = info.device
        self.cuda = self.dev.type == "cuda"
        self.split = cfg.batch_split(info.world_size)  # micro-batches per rank, tokens of one
        self.log = RunLog(info.is_main)
        self.model, self.fwd = self._build_model()
        self.doc_backend = self._doc_backend()  # train.doc_packing's attention kernel, or None
        self.opt = build_optimizers(self.model.optimizer_groups(), cfg, info)
        self.avg = WeightAverages(self.model, cfg.ema_decay, cfg)
        self.hess = hessian.HessianAccumulator(self.model.hessian_shapes(), self.dev)
        self.hess_schedule = hessian.HessianSchedule(self.hess, cfg.hessian_every, cfg.hessian_start_scale,
                                                     cfg.iterations, cfg.max_wallclock_seconds,
                                                     online=cfg.hessian_source == "online")
        self.loader = self._new_loader()
        self.fp = checkpoint.fingerprint(mcfg, cfg, info.world_size, inputs.data_id)
        self.step = 0
        self.clock = Clock()
        self.elapsed_ms = 0.0
        self.stopped_by = "iterations"
        self.triggers = Triggers(self.model, cfg, self.log)
        self.timer = StepTimer(self.cuda)  # per-step device time, for the Hessian overhead
        self.resumed_from = 0
        self.checkpoint_status = "no checkpoint"
        self.priming = Priming()
        self._loader_state: dict | None = None  # set by a resume, applied after the warmup

    def _build_model(self) -> tuple[GPT, torch.nn.Module]:
        """The seeded model and the forward training calls (compiled on CUDA with train.compile)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = GPT(self.mcfg, qat_quantile=cfg.qat_clip_quantile, train_seq_len=cfg.seq_len).to(self.dev)
        model.head_hessian = cfg.hessian_head  # hessians.pgt also gets the tied head's input Gram
        self.compiled = self.cuda and cfg.compile
        if self.cuda:
            use_cuda_training_kernels(model, cfg)
        if not self.compiled:
            return model, model
        return model, compile_forward(model, cfg.compile_scope, autotune=cfg.compile_autotune)

    def _doc_backend(self) -> str | None:
        if not self.cfg.doc_packing:
            return None
        from pgolf.shared import docattn

        try:
            return docattn.resolve(self.cfg.doc_attn_backend, self.dev)
        except ValueError as e:
            raise TrainError(f"train.doc_attn_backend: {e}") from None

    def _next_batch(self, seq_len: int) -> tuple[Tensor, Tensor, docattn.DocSegments | None]:
        """This rank's next micro-batch: (x, y) rows of seq_len (B, T) and no segments, or with
        train.doc_packing one packed row (1, micro_tokens) and its document segments, each at
        most seq_len tokens (pgolf.shared.docattn)."""
        if self.doc_backend is None:
            x, y = self.loader.next_batch(self.split.micro_tokens, seq_len)  # (B, T)
            return x, y, None
        from pgolf.shared import docattn

        x, y, cu = self.loader.next_packed(self.split.micro_tokens, seq_len)  # (1, N), (1, N), (S,)
        return x, y, docattn.segments(cu, x.size(1), seq_len, self.doc_backend)

    def _new_loader(self) -> DistributedTokenLoader:
        return DistributedTokenLoader(self.inputs.train_shards, self.info.rank, self.info.world_size, self.dev)

    @property
    def step_ms(self) -> list[float]:
        return self.timer.ms

    @property
    def step_kind(self) -> list[str]:
        return self.hess_schedule.step_kind

    # -- one optimizer step

    def _step(self, step: int, scale: float, seq_len: int, hessians: dict[str, Tensor] | None,
              ema: bool = True) -> Tensor:
        """Forward/backward over the micro-batches of `seq_len` tokens each row (the first also
        capturing into `hessians` unless None), clip, optimizer step, EMA -> mean loss (device)."""
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.dev)
        with self.model.qat_weights():  # late QAT: the banks hold Q(w) until the update
            for micro in range(self.split.accum):
                total += self._micro_step(seq_len, hessians if micro == 0 else None)
        with record_function("pgolf.optimizer"):
            if self.cfg.grad_clip > 0:
                self.opt.clip_grad_norm_(self.cfg.grad_clip)
            self.opt.step(scale, muon_momentum_at(step, self.cfg))
            self.opt.zero_grad(set_to_none=True)
        if ema:
            with record_function("pgolf.ema"):
                self.avg.update_ema()
        return total / self.split.accum

    def _micro_step(self, seq_len: int, capture: dict[str, Tensor] | None) -> Tensor:
        """One micro-batch's forward and backward -> its loss (detached)."""
        with record_function("pgolf.data"):
            x, y, docs = self._next_batch(seq_len)  # (B, T); docs: train.doc_packing's segments
        if capture is not None and self.compiled:  # keep the compiled graph capture-free
            hessian.capture(self.model, x, capture, self.cuda, docs)
            capture = None
        with record_function("pgolf.fwd"), autocast(self.cuda):
            loss = self.fwd(x, y, hessians=capture, docs=docs)  # eager: captured in the training forward
        with record_function("pgolf.bwd"):
            (loss / self.split.accum).backward()
        return loss.detach()

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
        self.triggers.resume(progress.qat_start_step, progress.loop_start_step)
        self._loader_state = progress.loader
        self.checkpoint_status = "resumed"
        self.resumed_from = self.step
        self.log(f"resume: from {path} at step {self.step} ({self.elapsed_ms / 1000:.1f} s of training)")

    def save_checkpoint(self) -> None:
        """The whole training state into the checkpoint (pgolf.train.checkpoint); collective, rank 0 writes."""
        progress = checkpoint.Progress(self.step, self.elapsed_ms, self.triggers.qat_start_step,
                                       self.triggers.loop_start_step, self.loader.state_dict())
        checkpoint.save(checkpoint.checkpoint_path(self.cfg), self._parts(), self.fp, progress, self.info)

    # -- the loop

    def warmup(self) -> None:
        """Compile priming (pgolf.train.priming), then a fresh loader at the run's position."""
        if self.cfg.warmup_steps > 0:
            primer = Primer(self.model, self._priming_step, self.info, self.log)
            self.priming = primer.prime(self.opt, self.cfg.warmup_steps, self.cfg.seq_lens())
        self.loader = self._new_loader()
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)

    def _priming_step(self, seq_len: int, hessians: dict[str, Tensor] | None) -> None:
        self._step(self.step, 1.0, seq_len, hessians, ema=False)

    def train(self, on_step: Callable[["Trainer"], None] | None = None) -> None:
        if self.resumed_from == 0:
            self.log(f"train: {self.model.num_params():,} params, world {self.info.world_size}, grad_accum "
                     f"{self.split.accum}, {self.cfg.batch_tokens:,} tokens/step, device {self.dev}, "
                     f"compile {self.compiled}, doc packing {self.doc_backend or 'off'}, exported weights: "
                     f"{'swa' if self.cfg.swa_enabled else 'ema'}")
        self.clock.start()
        while self.step < self.cfg.iterations:
            last = self._train_step()
            if on_step is not None:
                on_step(self)
            if last:
                break
        sync(self.dev)  # the training time includes the device finishing the queued work
        self.clock.pause()
        self.elapsed_ms = shared_max(self.clock.ms(), self.info)
        self.model.set_looping(True)  # evaluated as the evaluate stage rebuilds it: looping when configured

    def _train_step(self) -> bool:
        """One step of the loop with its schedule triggers, log line and checkpoint -> last step?"""
        cfg, step = self.cfg, self.step
        scale = lr_scale(step, self.elapsed_ms, cfg)
        self.triggers.before_step(step, scale, self.elapsed_ms)
        capture = self.hess_schedule.due(step, scale, self.elapsed_ms)
        self.timer.start()
        lr = lr_multiplier(scale, cfg)  # the triggers above read the unfloored scale
        loss = self._step(step, lr, self.triggers.seq_len, self.hess.sums if capture else None)
        if capture:
            self.hess.record(self.split.micro_tokens)
        self.timer.stop()  # no sync: the host queues the next step while the device works
        self.hess_schedule.label(capture, scale)
        self.step += 1
        self.elapsed_ms = shared_max(self.clock.ms(), self.info)
        if self.avg.maybe_snapshot(self.step, scale) and self.avg.swa_count == 1:
            self.log(f"swa: first snapshot at step {self.step} (lr scale {scale:.4f})")
        last = self._at_the_end()
        if self.step == 1 or last or (cfg.log_every > 0 and self.step % cfg.log_every == 0):
            self._log_step(loss, lr)
        if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0 and not last:
            self._checkpoint(loss)
        return last

    def _at_the_end(self) -> bool:
        """The last iteration done, or the wallclock cap reached (`stopped_by` says which)."""
        cap_ms = self.cfg.max_wallclock_seconds * 1000.0
        if cap_ms > 0 and self.elapsed_ms >= cap_ms and self.step < self.cfg.iterations:
            self.stopped_by = "wallclock"
        return self.step == self.cfg.iterations or self.stopped_by == "wallclock"

    def _checkpoint(self, loss: Tensor) -> None:
        """Save a checkpoint off the training clock, never over a good one with a NaN state."""
        sync(self.dev)
        self.clock.pause()
        self._check_finite(mean_over_ranks(loss, self.info))
        self.save_checkpoint()
        self.clock.start()

    def _check_finite(self, loss_v: float) -> None:
        """Stop on a NaN/inf loss; the last checkpoint written (a finite state) is kept."""
        if not math.isfinite(loss_v):
            kept = checkpoint.checkpoint_path(self.cfg)
            kept = f"; the last good checkpoint {kept} is kept" if kept.is_file() else ""
            raise TrainError(f"training diverged at step {self.step}: loss {loss_v} (try lower train.*_lr){kept}")

    def _log_step(self, loss: Tensor, lr: float) -> None:
        loss_v = mean_over_ranks(loss, self.info)
        self._check_finite(loss_v)
        self.log.step(self.cfg, self.step, loss_v, lr, self.elapsed_ms)

    # -- the end

    def finish(self) -> TrainResult:
        """Hessians (cross-rank), exported weights into the model, val_bpb_float, metrics."""
        online = self._hessians() if self.hess_schedule.online else None  # (hessians, meta)
        live = self._val() if self.cfg.val_live else None  # the live weights, before the exported ones go in
        ev, eval_s = self._evaluate_final()
        calib = self._calibration() if self.cfg.calibration_batches > 0 else None
        hess, hmeta = online or calib[:2]  # train.hessian_source: online unless calibration (then no online)
        export = {n: t.detach().float().cpu().contiguous() for n, t in self.model.export_state_dict().items()}
        run = Counters(self.step, self.elapsed_ms, self.info.world_size, self.split.accum, self.stopped_by,
                       self.resumed_from, self.checkpoint_status)
        m = train_metrics(run, ev, eval_s, hmeta, self.hess_schedule.overhead(self.step_ms), self.triggers,
                          self.avg, self.priming, self.model, self.cfg, self.info)
        if live is not None:
            m.update(val_bpb_live=live["val_bpb"], val_loss_live=live["val_loss"])
        if calib is not None:
            _, cmeta, cal_s = calib
            m.update(hessian_source=self.cfg.hessian_source, calibration_batches=cmeta["accumulations"],
                     calibration_seqs=self.cfg.calibration_seqs, calibration_rows=cmeta["rows"],
                     calibration_seconds=round(cal_s, 3))
        self.log(final_line(m, ev, eval_s))
        return TrainResult(m, export, hess, hmeta, self.log.text(), list(self.log.rows))

    def _calibration(self) -> tuple[dict[str, Tensor], dict, float]:
        """train.calibration_batches: Hessians of the exported weights (already in the model, QAT
        off, looping as configured) from calibration_batches batches of calibration_seqs rows of
        seq_len per rank: the training stream's next tokens, each rank its slice (dense rows, also
        with train.doc_packing) -> (hessians, meta, seconds). Runs after the training clock stopped;
        its seconds are reported (metrics calibration_seconds), never added to train_seconds."""
        seq_len = self.cfg.seq_len
        local = self.cfg.calibration_seqs * seq_len

        def next_rows() -> Tensor:
            return self.loader.next_batch(local, seq_len)[0]  # (calibration_seqs, seq_len)

        sync(self.dev)
        t0 = time.perf_counter()
        hess, meta = hessian.calibrate(self.model, next_rows, self.cfg.calibration_batches, self.cuda)
        sync(self.dev)
        secs = shared_max((time.perf_counter() - t0) * 1000.0, self.info) / 1000.0
        train_files.validate_hessians(hess, self.model.hessian_shapes(), "calibration Hessians")
        self.log(f"calibration: {meta['accumulations']} batches x {self.cfg.calibration_seqs} seqs of {seq_len} "
                 f"per rank, {meta['rows']:,} rows, on the exported weights after the training clock, "
                 f"{secs:.1f} s (not in train_seconds); hessians.pgt holds the {self.cfg.hessian_source} Hessians")
        return hess, meta, secs

    def _hessians(self) -> tuple[dict[str, Tensor], dict]:
        """The run's Hessians over all ranks (after the schedule's fallback if no step captured)."""
        if self.hess_schedule.needs_fallback():
            x, _, docs = self._next_batch(self.cfg.seq_len)  # (B, T)
            hessian.capture_fallback(self.model, x, self.hess, self.cuda, docs)
            self.log(hessian.FALLBACK_NOTE)
        hess, hmeta = self.hess.finalize()
        train_files.validate_hessians(hess, self.model.hessian_shapes(), "online Hessians")
        return hess, hmeta

    def _evaluate_final(self) -> tuple[dict, float]:
        """The exported weights into the model, then their `_val` -> (eval, seconds)."""
        final = self.avg.final()
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(final[n])
        t0 = time.perf_counter()
        ev = self._val()
        return ev, time.perf_counter() - t0

    def _val(self) -> dict:
        """The model's weights as they stand, QAT off: their non-sliding val loss (with
        train.doc_packing attention within documents)."""
        self.model.set_qat(False)  # the float weights as they are exported
        ev = eval_nonsliding(self.model, self.inputs.val_tokens, self.inputs.tables, self.cfg.seq_len,
                             self.cfg.val_batch_seqs, self.dev, self.info.rank, self.info.world_size,
                             autocast=self.cuda, compile=self.cuda and self.cfg.compile, doc_backend=self.doc_backend)
        ev["byte_source"] = val_bytes.byte_source(self.inputs.tables)  # sidecar: original bytes (CaseOps data)
        return ev


def run(mcfg: ModelConfig, cfg: TrainConfig, paths: Paths | None = None,
        on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
    """Train (resuming from a matching checkpoint), write the outputs (rank 0), delete the
    checkpoint; `mcfg` and `cfg` as pgolf.config loads them (range-checked there).
    `on_step(trainer)` runs after every completed step (trainer.step steps done, checkpoint
    already written): tests use it to observe or to simulate a crash."""
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
