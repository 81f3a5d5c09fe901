"""Training time: the training clock (paused around checkpoints) and per-step device times.

This module owns how a run measures time: `Clock` is the wallclock the lr schedule and the cap
read (host time, running only between `start` and `pause`); `StepTimer` gives each step's
duration without a device synchronisation per step (the Hessian overhead metrics read them).
Both are restored from a training checkpoint (pgolf.train.checkpoint).
"""

from __future__ import annotations

import time

import torch


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
