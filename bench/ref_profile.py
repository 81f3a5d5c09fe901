"""An anchor's unmodified script, run as __main__ with torch.profiler over a window of its training steps.

    python -m bench.ref_profile SCRIPT --at 20 --steps 3 --accum 8 --out ref_profile.json [--trace T.json.gz]

A step is one `step()` of the script's optimizer of class `--optimizer` (Muon, which every anchor
steps once per training step), counted from the last `load_state_dict` of any optimizer: the
anchors restore their optimizers after their compile warm-up, so the count starts with training
(nothing is counted before the first restore, and a window open at a restore is dropped).
Once `--at` steps are done, the next `--steps` run under the profiler (CPU and CUDA activities). When the
window closes, the trace is summarised as pgolf's own profile is (bench.profile_train.summarise_trace:
top kernels, GPU busy and idle ms per step), written to `--out` with the window, and the process
exits: the rest of the script's run is not needed. The script reads its settings from the
environment as usual (bench.bench_vs_ref sets them).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class Window:
    """Counts the optimizer's steps since its last state restore; profiles steps [at, at + steps)."""

    def __init__(self, optimizer: str, at: int, steps: int, accum: int, out: Path, trace: Path | None):
        self.optimizer, self.at, self.steps, self.accum = optimizer, at, steps, accum
        self.out, self.trace = out, trace
        self.count = None  # steps since the last restore; None before the first
        self.prof = None

    def restored(self) -> None:
        """A restore ends the warm-up: counting (re)starts, and a window opened before is dropped."""
        self.drop()
        self.count = 0

    def drop(self) -> None:
        """Close an open window without writing anything."""
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None

    def stepped(self, opt: torch.optim.Optimizer) -> None:
        if type(opt).__name__ != self.optimizer or self.count is None:
            return
        self.count += 1  # training steps done
        if self.count == self.at:
            self._start()
        elif self.count == self.at + self.steps and self.prof is not None:
            self._finish()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof = profile(activities=acts)
        self.prof.__enter__()

    def _finish(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        from bench.profile_train import summarise_profiler  # after the window: nothing of pgolf's loads before

        summary = summarise_profiler(self.prof, self.steps, self.accum, self.trace)
        self.out.write_text(json.dumps({"program": "reference", "optimizer": self.optimizer,
                                        "profiled_steps": [self.at + 1, self.at + self.steps],
                                        "profile": summary}, indent=1) + "\n")
        print(f"ref_profile: steps {self.at + 1}-{self.at + self.steps} profiled -> {self.out}", flush=True)
        os._exit(0)


def install(window: Window) -> None:
    """The global optimizer step hook and a load_state_dict wrapper that feed `window`."""
    register_optimizer_step_post_hook(lambda opt, args, kwargs: window.stepped(opt))
    load = torch.optim.Optimizer.load_state_dict

    def load_state_dict(self, state_dict):
        window.restored()
        return load(self, state_dict)

    torch.optim.Optimizer.load_state_dict = load_state_dict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("script", type=Path)
    ap.add_argument("--at", type=int, default=20, help="training steps done before the window opens")
    ap.add_argument("--steps", type=int, default=3, help="training steps profiled")
    ap.add_argument("--accum", type=int, default=8, help="micro-batches per step (reported with the summary)")
    ap.add_argument("--optimizer", default="Muon", help="class name of the optimizer stepped once per step")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trace", type=Path, default=None, help="also keep the Chrome trace (gzip)")
    a = ap.parse_args(argv)
    if a.at < 1 or a.steps < 1:
        ap.error(f"--at ({a.at}) and --steps ({a.steps}) must be >= 1")
    if not a.script.is_file():
        ap.error(f"{a.script} does not exist")
    window = Window(a.optimizer, a.at, a.steps, a.accum, a.out.resolve(), a.trace.resolve() if a.trace else None)
    install(window)
    sys.argv = [str(a.script)]
    sys.path.insert(0, str(a.script.resolve().parent))  # as `python SCRIPT` would
    runpy.run_path(str(a.script), run_name="__main__")
    window.drop()
    print(f"ref_profile: {a.script} ended before step {a.at + a.steps} of its optimizer {a.optimizer}", flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
