"""The weight averages of a training run: the EMA of every parameter and the SWA running sum.

This module owns which weights training exports (recipe-spec §4): the EMA (fp32, updated after
every optimizer step), or, when `train.swa_enabled` and at least one snapshot was taken, the SWA
mean of the *live* training weights (not the EMA) at every step s with s % swa_every == 0 whose
lr scale was < swa_threshold. Its state tensors (`ema/<param>`, `swa/<param>`) go into the
training checkpoint (pgolf.train.checkpoint).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.config import TrainConfig


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
