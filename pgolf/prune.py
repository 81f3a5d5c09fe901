"""Selective ±1 pruning (recipe-spec §7, with the fixes of §12.2): zero the cheapest ±1 codes
until the artifact fits.

Candidates are the low-bit ("int6"-type) codes equal to ±1. Zeroing the code at (row i, col j)
changes that weight by exactly the row scale s_i, so its cost is the increase of the mean
squared output error, s_i^2 * H_jj, with H_jj the input Hessian diagonal (the diagonal term of
d H d^T; cross terms with the row's other errors are ignored). Tensors without a Hessian
(GPTQ-lite) use H_jj = 1, i.e. the squared weight change s_i^2. All candidates are sorted
ascending by cost with a stable sort over (tensor order, flat index), so equal costs keep a fixed
order and the result is deterministic.

The count n of pruned candidates is searched so that `size(n)` (the caller's exact artifact
size: serialize + the compress stage's codec choice + code bytes) is <= target: size(0) first
(fits -> prune nothing), then size(all) (does not fit -> PruneError with the smallest reachable
size), then a bracketing search that keeps lo (known not to fit) and hi (known to fit) and ends
with hi = lo + 1, so the answer fits and one fewer pruned value verifiably does not. Probes are
placed where the straight line between the bracket ends crosses the target (compressed size is
close to linear in n), with the Illinois rule (an end kept twice has its distance to the target
halved) and a bisection step whenever three probes did not halve the bracket. On a simulated
record-size search (4.2 M candidates, size noise of ±30 bytes) this took 8-16 compress calls,
mean 11.6, against 25 for plain bisection. Real lzma sizes are much noisier (on the tiny
profile one more pruned value moved the size by up to 2 kB), so once the bracket is inside the
noise the search is bisection and the count approaches plain bisection's (20 calls for 150 K
candidates there). The size function is called once per probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


class PruneError(ValueError):
    """The pruning target cannot be met."""


@dataclass
class Candidates:
    names: list[str]  # tensors (the `.q` keys) holding candidates, in tensor order
    flat: dict[str, torch.Tensor]  # name -> (k,) int64 flat indices of its ±1 codes
    rank: dict[str, torch.Tensor]  # name -> (k,) int64 global rank in the ascending cost order
    cost_sorted: np.ndarray  # (total,) float64 costs in pruning order

    @property
    def total(self) -> int:
        return int(self.cost_sorted.size)

    def cost_of_first(self, n: int) -> float:
        return float(self.cost_sorted[:n].sum())


def collect(codes: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
            hdiag: dict[str, torch.Tensor | None]) -> Candidates:
    """codes[name] (R, C) int8, scales[name] (R,) fp16, hdiag[name] (C,) or None -> sorted candidates."""
    names, flats, costs = [], [], []
    for name, q in codes.items():
        flat = torch.nonzero(q.reshape(-1).abs() == 1).reshape(-1)  # (k,) ascending flat index
        if flat.numel() == 0:
            continue
        rows, cols = flat // q.shape[1], flat % q.shape[1]
        s2 = scales[name].double()[rows] ** 2  # (k,)
        h = hdiag.get(name)
        cost = s2 * (h.double()[cols] if h is not None else 1.0)
        names.append(name)
        flats.append(flat)
        costs.append(cost.numpy())
    if not names:
        return Candidates([], {}, {}, np.zeros(0))
    all_cost = np.concatenate(costs)
    order = np.argsort(all_cost, kind="stable")  # (total,)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    out_rank, start = {}, 0
    for name, flat in zip(names, flats):
        out_rank[name] = torch.from_numpy(rank[start:start + flat.numel()].copy())
        start += flat.numel()
    return Candidates(names, dict(zip(names, flats)), out_rank, all_cost[order])


def apply(codes: dict[str, torch.Tensor], cands: Candidates, n: int) -> dict[str, torch.Tensor]:
    """Copies of the codes with the n cheapest candidates zeroed (untouched tensors are shared)."""
    out = dict(codes)
    if n <= 0:
        return out
    for name in cands.names:
        sel = cands.flat[name][cands.rank[name] < n]
        if sel.numel():
            q = codes[name].clone()
            q.view(-1)[sel] = 0
            out[name] = q
    return out


@dataclass
class SearchResult:
    n: int  # candidates pruned
    size: int  # size(n)
    probes: list[tuple[int, int]] = field(default_factory=list)  # (n, size) in the order evaluated


def search(size_of: Callable[[int], int], total: int, target: int) -> SearchResult:
    """Smallest-bracket n in [0, total] with size_of(n) <= target and size_of(n - 1) > target."""
    probes: list[tuple[int, int]] = []

    def f(n: int) -> int:
        s = int(size_of(n))
        probes.append((n, s))
        return s

    f_lo = f(0)
    if f_lo <= target:
        return SearchResult(0, f_lo, probes)
    f_hi = f(total) if total > 0 else f_lo
    if total == 0 or f_hi > target:
        raise PruneError(f"quantize.target_bytes={target:,} is unreachable: pruning all {total:,} ±1 values "
                         f"gives {f_hi:,} bytes (smallest reachable size; unpruned {f_lo:,})")
    lo, hi = 0, total
    g_lo, g_hi = float(f_lo - target), float(f_hi - target)  # > 0 (too big), <= 0 (fits)
    kept, widths = "", [hi - lo]
    while hi - lo > 1:
        width = hi - lo
        if (len(widths) >= 4 and width > widths[-4] // 2) or g_lo == g_hi:
            m = (lo + hi) // 2  # three probes did not halve the bracket: bisect once
        else:
            m = lo + int(round(g_lo / (g_lo - g_hi) * width))  # where the line crosses the target
            m = min(max(m, lo + 1), hi - 1)
        fm = f(m)
        if fm <= target:
            hi, f_hi, g_hi = m, fm, float(fm - target)
            g_lo = g_lo / 2 if kept == "lo" else g_lo  # Illinois: lo stayed twice, pull the line to it
            kept = "lo"
        else:
            lo, g_lo = m, float(fm - target)
            g_hi = g_hi / 2 if kept == "hi" else g_hi
            kept = "hi"
        widths.append(hi - lo)
    return SearchResult(hi, f_hi, probes)
