"""bench/timing.py, the one way every bench times (on CPU): a stopwatch's wall and CPU seconds, one
timed call, per-call milliseconds after warm-up calls (the trainer's StepTimer, or the host clock),
their summary, and the interpreter path of the kernel timer."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import timing  # noqa: E402


def test_stopwatch_and_timed_measure_the_block_and_return_the_result():
    with timing.Stopwatch("cpu") as sw:
        time.sleep(0.02)
        sum(range(200_000))
    assert 0.02 <= sw.seconds < 5 and 0 < sw.cpu_seconds < sw.seconds + 1
    assert set(sw.as_dict(2)) == {"seconds", "cpu_seconds"} and sw.as_dict(2)["seconds"] == round(sw.seconds, 2)
    out, seconds = timing.timed(lambda a, b=0: (time.sleep(0.01), a + b)[1], 2, b=3, sync_device="cpu")
    assert out == 5 and 0.01 <= seconds < 5


@pytest.mark.parametrize("host", [False, True])
def test_call_ms_times_each_call_after_the_warmup_calls(host):
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.005 if len(calls) > 2 else 0.3)  # the two warm-up calls are the slow ones

    ms = timing.call_ms(fn, 4, warmup=2, device="cpu", host=host)
    assert len(calls) == 6 and len(ms) == 4
    assert all(5.0 <= t < 250.0 for t in ms), ms
    s = timing.summary_ms(ms)
    assert set(s) == {"mean_ms", "median_ms", "min_ms"} and s["min_ms"] <= min(s["median_ms"], s["mean_ms"])


def test_summary_ms_uses_the_true_median():
    assert timing.summary_ms([1.0, 2.0, 4.0, 9.0]) == {"mean_ms": 4.0, "median_ms": 3.0, "min_ms": 1.0}


def test_kernel_ms_on_the_interpreter_is_the_median_of_three_calls_after_one():
    calls = []
    slow = iter([0.0, 0.3, 0.002, 0.01])  # warm-up, then three timed calls

    def fn():
        calls.append(1)
        time.sleep(next(slow))

    ms = timing.kernel_ms(fn, interpreted=True)
    assert len(calls) == 4 and 10.0 <= ms < 250.0  # the middle one of 300, 2 and 10 ms
