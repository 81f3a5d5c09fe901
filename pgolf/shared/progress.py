"""Progress of the long loops (evaluation batches, corpus encoding, shard checks).

On a terminal this is a tqdm bar. When stderr is not a terminal (`dvc repro` piped to a file or
CI log, a batch job) tqdm stays silent, so this prints a plain line every INTERVAL_S seconds
instead: `eval: 120/400 batch (30%), 4.1 batch/s, ETA 68 s`, and a last line when done.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO

INTERVAL_S = 30.0  # seconds between plain progress lines when not on a terminal


def _eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s} s")


class Progress:
    """Counts units of work; reports through tqdm on a TTY, else as periodic plain lines."""

    def __init__(self, desc: str, unit: str, total: int | None = None, stream: TextIO | None = None,
                 interval_s: float | None = None):
        self.desc, self.unit, self.total = desc, unit, total
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.done, self.t0 = 0, time.perf_counter()
        self._last = self.t0
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(desc=desc, unit=unit, total=total, file=self.stream, mininterval=2.0)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        text = f"{self.desc}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.1f} {self.unit}/s, {_eta(elapsed)} elapsed"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_eta((self.total - self.done) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif time.perf_counter() - self.t0 >= self.interval_s:  # quiet for short loops
            print(self.line() + ", done", file=self.stream, flush=True)


def track(items: Iterable, desc: str, unit: str, total: int | None = None, **kw) -> Iterator:
    """Yield `items`, counting one unit per item (len(items) is the total when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    p = Progress(desc, unit, total, **kw)
    try:
        for item in items:
            yield item
            p.update()
    finally:
        p.close()
