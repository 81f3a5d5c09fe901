"""What the training loop asks of the device and of the other ranks.

This module owns the few calls every part of a step shares: the autocast of a training forward
(bf16 on CUDA, none on the CPU), the device synchronisation, and the two cross-rank reductions
that keep the ranks in step (MAX of a clock, so every rank takes the same schedule decisions;
the mean of a loss, for the log).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as tdist
from torch import Tensor

from pgolf.shared.dist import DistInfo


def autocast(cuda: bool):
    """The context of a training forward: bf16 autocast on CUDA, fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def shared_max(value: float, info: DistInfo) -> float:
    """MAX over ranks (every rank then takes the same schedule decisions)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def mean_over_ranks(t: Tensor, info: DistInfo) -> float:
    """The mean over ranks of a one-element tensor, as a float."""
    t = t.detach().float().reshape(1).clone()
    if info.enabled:
        tdist.all_reduce(t)
        t /= info.world_size
    return float(t.item())
