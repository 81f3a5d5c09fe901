"""The schedule's triggers: what changes during a run before a step, and from which step.

This module owns three switches the loop applies before every step, each logged when it happens:

* late QAT: `model.set_qat(True)` the first time the lr scale drops below
  `train.late_qat_threshold`; each step's forwards and backwards then run inside
  `model.qat_weights()` (Q(w) swapped into the banks, straight-through gradients), so the
  compiled graph never changes;
* depth recurrence (`model.num_loops`): off until the training fraction reaches
  `train.loop_enable_frac`, then on, also for the final evaluation and in the export;
* the sequence-length schedule (`train.seq_len_schedule`): shorter sequences (same tokens per
  step) until given training fractions, then `train.seq_len`.

The steps QAT and the loop started go into train.json and the training checkpoint.
"""

from __future__ import annotations

from typing import Callable

from pgolf.config import TrainConfig
from pgolf.shared.model import GPT, layer_order
from pgolf.train.schedule import seq_len_at, training_frac


class Triggers:
    """The switches of one run of `model`; `seq_len` is the current step's sequence length."""

    def __init__(self, model: GPT, cfg: TrainConfig, log: Callable[[str], None]):
        self.model, self.cfg, self.log = model, cfg, log
        if model.cfg.num_loops > 0 and cfg.loop_enable_frac > 0:
            model.set_looping(False)  # depth recurrence starts at train.loop_enable_frac
        self.qat_start_step: int | None = None
        self.loop_start_step: int | None = 0 if model.looping else None
        self.seq_len = seq_len_at(0.0, cfg)

    def before_step(self, step: int, scale: float, elapsed_ms: float) -> None:
        """Apply what is due before step `step` (lr scale `scale`, `elapsed_ms` of training)."""
        self._maybe_start_qat(step, scale)
        frac = training_frac(step, elapsed_ms, self.cfg)
        self._maybe_start_loops(step, frac)
        self._set_seq_len(step, frac)

    def resume(self, qat_start_step: int | None, loop_start_step: int | None) -> None:
        """The start steps a checkpoint recorded (it switched the model's QAT and loop itself)."""
        self.qat_start_step, self.loop_start_step = qat_start_step, loop_start_step

    def metrics(self) -> dict:
        return {"qat_start_step": self.qat_start_step, "loop_start_step": self.loop_start_step}

    def _maybe_start_qat(self, step: int, scale: float) -> None:
        """Late QAT: on the first step whose lr scale is below train.late_qat_threshold."""
        threshold = self.cfg.late_qat_threshold
        if threshold > 0 and self.qat_start_step is None and scale < threshold:
            self.model.set_qat(True)
            self.qat_start_step = step
            self.log(f"late_qat: enabled at step {step} (lr scale {scale:.4f})")

    def _maybe_start_loops(self, step: int, frac: float) -> None:
        """Depth recurrence on once the training fraction reaches train.loop_enable_frac."""
        if self.model.looping or self.model.cfg.num_loops == 0:
            return
        if frac >= self.cfg.loop_enable_frac:
            self.model.set_looping(True)
            self.loop_start_step = step
            self.log(f"depth_recurrence: enabled at step {step} (frac {frac:.3f}), layers "
                     f"{layer_order(self.model.cfg)}")

    def _set_seq_len(self, step: int, frac: float) -> None:
        """Follow train.seq_len_schedule (a no-op without one); log each change."""
        n = seq_len_at(frac, self.cfg)
        if n != self.seq_len:
            self.log(f"seq_len: {n} from step {step}")
        self.seq_len = n
