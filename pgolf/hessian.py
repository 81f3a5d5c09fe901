"""Online Hessians of the quantizable matrices: schedule, accumulation, cross-rank sum, output.

This module owns the `artifacts/train/hessians.pgt` half of the training contract (recipe-spec
§6.5, with its §12.8 fix): for every matrix name of `GPT.quantizable_names()` the mean per
token of x^T x over the rows x that fed that matrix, summed over all ranks.

How training uses it (pgolf.train): on a step where `HessianAccumulator.due(step, scale)` holds,
the forward of that step's first micro-batch runs with `hessians=acc.sums`, so the model adds
x^T x (fp32, on the device) of that micro-batch into the buffers while it computes the training
loss; then `acc.record(rows)`. No extra data is consumed and nothing runs after the training
clock stops. At the end `acc.finalize()` sums buffers and row counts over ranks (all_reduce) and
divides by the rows; `validate` checks the result and `save` writes the tensorfile.

Differences from PR #1072 (deliberate): Hessians are summed over ranks instead of rank 0's only;
they are normalised by the number of rows (a per-token mean, independent of batch size and of
how many accumulations happened) instead of by the accumulation count; the data are the training
micro-batches themselves, not extra batches pulled from the loader; buffers stay on the device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pgolf import tensorfile
from pgolf.dist import all_reduce_

KIND = "hessians"


class HessianError(ValueError):
    """Hessians that are missing, mis-shaped or not a valid Gram matrix (NaN, negative diagonal)."""


class HessianAccumulator:
    """fp32 x^T x sums per quantizable matrix on one rank, plus the rows and accumulations seen.

    `every` = steps between accumulations once the lr scale is below `start_scale`
    (0 = never on schedule; the trainer still forces one at the end, see `due`).
    """

    def __init__(self, shapes: dict[str, int], every: int, start_scale: float, device):
        self.shapes = dict(shapes)
        self.every = int(every)
        self.start_scale = float(start_scale)
        self.sums = {n: torch.zeros(k, k, device=device) for n, k in self.shapes.items()}  # (n, n) fp32
        self.rows = 0  # rows (tokens) accumulated on this rank
        self.accumulations = 0

    def due(self, step: int, scale: float, force: bool = False) -> bool:
        """Accumulate on this step? Scheduled: every `every` steps once scale < start_scale;
        `force` (the trainer's last chance) when nothing was accumulated yet."""
        if force and self.accumulations == 0:
            return True
        return self.every > 0 and scale < self.start_scale and step % self.every == 0

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


def _sum_int(value: int, device) -> int:
    """An int summed over ranks (exact in float64 up to 2**53)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    return int(all_reduce_(t).item())


def validate(hessians: dict[str, torch.Tensor], shapes: dict[str, int], source: str = "hessians") -> None:
    """Every name present, (n, n) fp32, finite, symmetric (to fp32 matmul rounding), diagonal >= 0
    and not all zero; HessianError naming the tensor otherwise."""
    missing = [n for n in shapes if n not in hessians]
    if missing:
        raise HessianError(f"{source}: missing Hessian for {len(missing)} matrix(es), e.g. {missing[0]}")
    extra = sorted(set(hessians) - set(shapes))
    if extra:
        raise HessianError(f"{source}: Hessian for unknown matrix {extra[0]!r}")
    for name, k in shapes.items():
        h = hessians[name]
        if tuple(h.shape) != (k, k) or h.dtype != torch.float32:
            raise HessianError(f"{source}: {name} is {h.dtype} {tuple(h.shape)}, expected float32 ({k}, {k})")
        if not torch.isfinite(h).all():
            raise HessianError(f"{source}: {name} has non-finite entries (diverged training?)")
        d = torch.diagonal(h)
        scale = float(d.abs().max())
        if scale <= 0:
            raise HessianError(f"{source}: {name} has an all-zero diagonal (its input was always zero)")
        if float(d.min()) < -1e-6 * scale:
            raise HessianError(f"{source}: {name} has a negative diagonal entry {float(d.min()):.3e}")
        if float((h - h.T).abs().max()) > 1e-4 * scale:
            raise HessianError(f"{source}: {name} is not symmetric")


def save(path: str | Path, hessians: dict[str, torch.Tensor], meta: dict) -> int:
    """Write the contract file (kind "hessians", meta {rows, accumulations, world_size})."""
    return tensorfile.save(path, {n: t.float().contiguous() for n, t in hessians.items()}, kind=KIND,
                           meta={k: meta[k] for k in ("rows", "accumulations", "world_size")})


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(hessians, meta) of a `hessians.pgt`."""
    tensors, header = tensorfile.load(path, kind=KIND)
    return tensors, header["meta"]
