"""How the benches time things: one module, so that every figure under bench/results is taken one way.

* `Stopwatch`: a `with` block's wall seconds, the device synchronised on entry and exit (queued GPU
  work counts), and the process's CPU seconds over the same span (all threads);
* `timed(fn, *args, sync_device=None, **kw)`: one call under a Stopwatch -> (result, wall seconds);
* `call_ms(fn, repeats, warmup, device)`: each of `repeats` calls' milliseconds after `warmup`
  untimed ones. By default the device time: pgolf.train.timing.StepTimer, the trainer's own
  per-step timer (CUDA events around each call on a GPU, read once at the end; the host clock on a
  CPU). `host=True`: the time a caller waits instead (host clock, synchronised after each call),
  for work that runs on more than one stream (collectives);
* `median_ms(fn, repeats, warmup, device)`: their median; `summary_ms(times)`: mean, median and min;
* `kernel_ms(fn)`: the median of a kernel: triton.testing.do_bench on a GPU (the L2 cache flushed
  between runs), or, under the Triton interpreter, the median of 3 calls after one.
"""

from __future__ import annotations

import statistics
import time

import torch

from pgolf.train.device import sync as device_sync
from pgolf.train.timing import StepTimer


def is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def sync(device) -> None:
    """Wait for the work queued on `device` (torch.device, "cuda", "cpu"; None: nothing to wait for)."""
    if device is not None:
        device_sync(torch.device(device))


class Stopwatch:
    """`with Stopwatch(device) as sw: ...` -> sw.seconds (wall) and sw.cpu_seconds (this process)."""

    def __init__(self, device=None):
        self.device = device
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu

    def as_dict(self, digits: int = 3) -> dict:
        """{"seconds", "cpu_seconds"}, rounded (a JSON row's keys)."""
        return {"seconds": round(self.seconds, digits), "cpu_seconds": round(self.cpu_seconds, digits)}


def timed(fn, *args, sync_device=None, **kw):
    """(fn(*args, **kw), its wall seconds), `sync_device` synchronised before and after."""
    with Stopwatch(sync_device) as sw:
        out = fn(*args, **kw)
    return out, sw.seconds


def call_ms(fn, repeats: int, warmup: int = 2, device=None, host: bool = False) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn() after `warmup` untimed calls: device time
    (StepTimer: CUDA events on a GPU, the host clock otherwise), or with `host` the host clock
    around each call and a synchronisation of `device`."""
    for _ in range(warmup):
        fn()
    if host:
        sync(device)
        return [timed(fn, sync_device=device)[1] * 1000.0 for _ in range(repeats)]
    timer = StepTimer(is_cuda(device))
    for _ in range(repeats):
        timer.start()
        fn()
        timer.stop()
    return list(timer.ms)


def median_ms(fn, repeats: int, warmup: int = 2, device=None) -> float:
    """The median of `call_ms` (device time), rounded to the microsecond."""
    return round(statistics.median(call_ms(fn, repeats, warmup, device)), 3)


def summary_ms(times: list[float]) -> dict:
    return {"mean_ms": round(statistics.fmean(times), 3), "median_ms": round(statistics.median(times), 3),
            "min_ms": round(min(times), 3)}


def kernel_ms(fn, grad_to_none=None, *, interpreted: bool = False, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench (`warmup_ms`, then `rep_ms` of runs;
    `grad_to_none` cleared before each) on a GPU; the median of 3 host-timed calls after one when
    `interpreted` (the Triton interpreter on a CPU)."""
    if interpreted:
        return median_ms(fn, 3, warmup=1)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
