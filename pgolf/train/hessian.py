"""Online Hessians of the quantizable matrices: schedule, capture, accumulation, cross-rank sum.

This module computes the content of `artifacts/train/hessians.pgt` (recipe-spec §6.5, with its
§12.8 fix; the file itself, its check and its reader are pgolf.shared.train_files'): for every
name of `GPT.hessian_shapes()` (the quantizable matrices; with train.hessian_head also the tied
head, "tok_emb.weight", whose rows are the final norm's output) the mean per token of x^T x over
the rows x that fed that matrix, summed over all ranks. It also owns when training captures
them, how, and what that costs (`HessianSchedule`, `capture`, `hessian_overhead`).

How training uses it (pgolf.train.train): before each step the trainer asks
`HessianSchedule.due(step, scale, elapsed_ms)`: every `train.hessian_every` steps once the lr
scale is below `train.hessian_start_scale` (the window), or forced on the last chance (the last
iteration, or the next step would reach the wallclock cap) when nothing was captured yet. On a
capture step the step's first micro-batch feeds the buffers `acc.sums` (fp32, on the device):
inside its training forward when the model runs eagerly (CPU), or, when that forward is
compiled, through one extra no-grad forward of the uncompiled model with the same weights
(`capture`; so only one graph is ever compiled); then `acc.record(rows)`, and `schedule.label(...)`
records the step's kind for the overhead. No extra data is consumed and nothing runs after the
training clock stops, except the fallback (`needs_fallback`, `capture_fallback`): when no step
captured one, one extra micro-batch after training. At the end `acc.finalize()` sums buffers and
row counts over ranks (all_reduce) and divides by the rows; `train_files.validate_hessians` checks
the result and `train_files.save_hessians` writes it.

Calibration instead (`calibrate`; train.calibration_batches > 0, PR #2135's GPTQ calibration):
after the training clock stopped and the exported weights are in the model, calibration_batches
batches of calibration_seqs rows of seq_len (the training stream's next tokens, each rank its
slice) go through no-grad forwards in eval mode with looping as configured, into a fresh
accumulator finalised the same way (per-row mean over all ranks); train.hessian_source picks
which the file holds (calibration_seconds: not part of train_seconds). With `calibration` no step
captures online Hessians (they would cost training time and go unused); with `online` the
calibration only adds its metrics.

Differences from PR #1072 (deliberate): Hessians are summed over ranks instead of rank 0's only;
they are normalised by the number of rows (a per-token mean, independent of batch size and of
how many accumulations happened) instead of by the accumulation count; the data are the training
micro-batches themselves, not extra batches pulled from the loader; buffers stay on the device.
"""

from __future__ import annotations

import statistics

import torch
from torch.profiler import record_function

from pgolf.shared.dist import all_reduce_
from pgolf.shared.model import GPT
from pgolf.shared.train_files import HessianError
from pgolf.train.device import autocast


class HessianAccumulator:
    """fp32 x^T x sums per quantizable matrix on one rank, plus the rows and accumulations seen."""

    def __init__(self, shapes: dict[str, int], device):
        self.shapes = dict(shapes)
        self.sums = {n: torch.zeros(k, k, device=device) for n, k in self.shapes.items()}  # (n, n) fp32
        self.rows = 0  # rows (tokens) accumulated on this rank
        self.accumulations = 0

    def record(self, rows: int) -> None:
        """Count one accumulation of `rows` rows (after the forward filled `self.sums`)."""
        self.rows += int(rows)
        self.accumulations += 1

    # -- resume: the state is the cross-rank sum, held by rank 0 (world-size independent)

    def state_tensors(self, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
        """(rank 0: the cross-rank sums on CPU; others: {}), meta. A collective when distributed."""
        sums = {n: t.clone() for n, t in self.sums.items()}
        for t in sums.values():
            all_reduce_(t)
        rows = _sum_int(self.rows, next(iter(self.sums.values())).device)
        meta = {"rows": rows, "accumulations": self.accumulations}
        return ({n: t.cpu() for n, t in sums.items()} if rank == 0 else {}), meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict, rank: int) -> None:
        """Inverse of `state_tensors`: rank 0 takes the sums and rows, other ranks start at zero."""
        for n, t in self.sums.items():
            if rank == 0:
                if n not in tensors or tuple(tensors[n].shape) != tuple(t.shape):
                    raise HessianError(f"checkpoint Hessian {n!r} is missing or mis-shaped")
                t.copy_(tensors[n])
            else:
                t.zero_()
        self.rows = int(meta["rows"]) if rank == 0 else 0
        self.accumulations = int(meta["accumulations"])

    # -- the end of training

    def finalize(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Sum over ranks, divide by the total rows -> ({name: (n, n) fp32 CPU}, meta).

        A collective when distributed (every rank gets the result). meta = {rows, accumulations,
        world_size}. Raises HessianError when nothing was accumulated.
        """
        dev = next(iter(self.sums.values())).device
        rows = _sum_int(self.rows, dev)
        world = _sum_int(1, dev)
        if rows <= 0 or self.accumulations == 0:
            raise HessianError("no Hessian was accumulated during training (0 rows)")
        out = {}
        for n, t in self.sums.items():
            s = all_reduce_(t.clone())  # (n, n) sum over ranks
            out[n] = (s.double() / rows).float().cpu()
        return out, {"rows": rows, "accumulations": self.accumulations, "world_size": world}


# ----------------------------------------------------------------------------- capture


@torch.no_grad()
def capture(model: GPT, x: torch.Tensor, sums: dict[str, torch.Tensor], cuda: bool, docs=None) -> None:
    """Add x^T x of micro-batch `x` (B, T) (with train.doc_packing one row and its `docs`
    segments, pgolf.shared.docattn) into `sums` for every quantizable matrix, with one extra
    no-grad forward of the uncompiled `model` (the weights the step's forward sees) up to the final
    norm (the tied head's Hessian, if any, is that norm's output: no logits or loss); no second
    graph is ever compiled.
    For compiled training and the fallback; an eager training step captures inside its training
    forward, at no extra cost."""
    with record_function("pgolf.hessian"), autocast(cuda), torch.compiler.set_stance("force_eager"):
        model.forward_hidden(x, sums, docs)  # eager also where compile_scope compiled the blocks in place


def capture_fallback(model: GPT, x: torch.Tensor, acc: HessianAccumulator, cuda: bool, docs=None) -> None:
    """The schedule's fallback (`HessianSchedule.needs_fallback`): capture the next training
    micro-batch `x` (and its `docs`) after the clock stopped, and count it."""
    capture(model, x, acc.sums, cuda, docs)
    acc.record(x.numel())


# ----------------------------------------------------------------------------- calibration


def calibrate(model: GPT, next_rows, batches: int, cuda: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """train.calibration_batches: Hessians after training (PR #2135's GPTQ calibration), from
    `batches` calls of `next_rows()` -> (B, T) token rows of training data, each through one no-grad
    forward of `model` (the exported weights, eval mode, looping as configured) into a fresh
    accumulator -> `HessianAccumulator.finalize()`: the per-row mean of x^T x over every rank.
    A collective when distributed. The caller times it (it runs after the training clock)."""
    acc = HessianAccumulator(model.hessian_shapes(), next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(int(batches)):
            x = next_rows()  # (B, T)
            capture(model, x, acc.sums, cuda)
            acc.record(x.numel())
    finally:
        model.train(was_training)
    return acc.finalize()


# ----------------------------------------------------------------------------- the schedule

STEP_KINDS = ("h", "w", "n")  # a capture step, a normal step inside the window, any other step
FALLBACK_NOTE = "hessian: no step captured one; took one extra micro-batch after training"


class HessianSchedule:
    """When training captures Hessians into `acc`, and the kind of every step done (`step_kind`).

    `every` = steps between captures once the lr scale is below `start_scale` (0 = never on
    schedule); `iterations` and `max_wallclock_seconds` (0 = no cap) bound the last chance, on
    which a capture is forced when `acc` has none yet. `online` False (train.hessian_source
    calibration): no step captures and there is no fallback.
    """

    def __init__(self, acc: HessianAccumulator, every: int, start_scale: float, iterations: int,
                 max_wallclock_seconds: float, online: bool = True):
        self.acc = acc
        self.online = bool(online)
        self.every = int(every)
        self.start_scale = float(start_scale)
        self.iterations = int(iterations)
        self.cap_ms = float(max_wallclock_seconds) * 1000.0
        self.step_kind: list[str] = []  # one of STEP_KINDS per step done (checkpointed)

    def in_window(self, scale: float) -> bool:
        return scale < self.start_scale

    def scheduled(self, step: int, scale: float) -> bool:
        """Every `every` steps inside the window."""
        return self.every > 0 and self.in_window(scale) and step % self.every == 0

    def last_chance(self, step: int, elapsed_ms: float) -> bool:
        """The last iteration, or the next step would reach the wallclock cap (from the mean step time)."""
        if step == self.iterations - 1:
            return True
        return self.cap_ms > 0 and step > 0 and elapsed_ms + 1.5 * elapsed_ms / step >= self.cap_ms

    def due(self, step: int, scale: float, elapsed_ms: float) -> bool:
        """Capture on step `step` (lr scale `scale`, `elapsed_ms` of training before it)?"""
        if not self.online:
            return False
        if self.acc.accumulations == 0 and self.last_chance(step, elapsed_ms):
            return True
        return self.scheduled(step, scale)

    def label(self, captured: bool, scale: float) -> str:
        """Record (and return) the kind of the step just done, for `overhead`."""
        kind = "h" if captured else ("w" if self.in_window(scale) else "n")
        self.step_kind.append(kind)
        return kind

    def needs_fallback(self) -> bool:
        """No step captured one (cannot happen on the step-based schedule): the trainer then
        feeds one extra micro-batch after the clock stopped."""
        return self.online and self.acc.accumulations == 0

    def overhead(self, step_ms: list[float]) -> dict:
        return hessian_overhead(step_ms, self.step_kind, self.every)


def hessian_overhead(step_ms: list[float], step_kind: list[str], every: int) -> dict:
    """The cost of online Hessians from per-step times (kinds: "h" Hessian step, "w" normal step
    inside the Hessian window, "n" other).

    Median ms of the Hessian steps vs the normal steps of the window (all non-Hessian steps but
    the first when the window has none); the extra ms per Hessian step amortised over `every`
    steps (over all steps when `every` is 0), as % of the normal step time. Medians, so one-off
    costs (a recompile, a stall of the machine) do not count.
    """
    h = [t for t, k in zip(step_ms, step_kind) if k == "h"]
    w = [t for t, k in zip(step_ms, step_kind) if k == "w"]
    if not w:
        w = [t for i, (t, k) in enumerate(zip(step_ms, step_kind)) if k != "h" and i > 0]
    out = {"hessian_step_ms": None, "normal_step_ms": None, "hessian_overhead_pct": None}
    if not h or not w:
        return out
    hm, wm = statistics.median(h), statistics.median(w)
    per = every if every > 0 else len(step_ms)
    out.update(hessian_step_ms=round(hm, 3), normal_step_ms=round(wm, 3),
               hessian_overhead_pct=round(100.0 * (hm - wm) / per / wm, 3))
    return out


def _sum_int(value: int, device) -> int:
    """An int summed over ranks (exact in float64 up to 2**53)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    return int(all_reduce_(t).item())
