"""Selective ±1 pruning (recipe-spec §7, with the fixes of §12.2): zero the cheapest ±1 codes
until the artifact fits; the compress stage (pgolf.compress.compress) runs it, as the owner of the bytes.

Candidates are the low-bit ("int6"-type) codes equal to ±1. Zeroing the code at (row i, col j)
changes that weight by exactly the row scale s_i, so its cost is the increase of the mean
squared output error, s_i^2 * H_jj, with H_jj the input Hessian diagonal (the diagonal term of
d H d^T; cross terms with the row's other errors are ignored). Tensors without a Hessian
(GPTQ-lite) use H_jj = 1, i.e. the squared weight change s_i^2. All candidates are sorted
ascending by cost with a stable sort over (tensor order, flat index), so equal costs keep a fixed
order and the result is deterministic.

The count n of pruned candidates is searched against `size(n)`, the caller's real size (serialize
+ one codec + code bytes; every probe is a real compression). A predictor `P(n)` (`Entropy`: the
order-0 entropy, in bytes, of every code tensor after pruning n, per tensor; exact for any n from
per-tensor counts, no compression) tells where to probe: the real size is modelled as
size(a) + k * (P(n) - P(a)) from the last real point a, with k (compressed bytes per entropy byte)
calibrated by the secant of the last two real sizes (1.0 before the second). Once a fitting n is
known, probes fall where the calibrated line between the bracket ends (lo: does not fit, hi: fits)
crosses the target, with the Illinois rule and a bisection step whenever three probes did not
halve the bracket. The contract, by `slack` (compress.prune_slack_bytes):

  * slack 0 (exact): the answer n fits and n - 1 verifiably does not (hi = lo + 1);
  * slack > 0 (cheaper): probes aim at target - slack / 2 and the answer is the first n whose
    real size fits (a miss recalibrates k and aims lower, the margin doubling). Not the smallest
    n that fits: it prunes about slack / 2 bytes' worth more than needed, plus the predictor's
    error. Real compressed sizes are far from smooth in n (zstd-22 on the record-size synthetic
    model: +858 KB for one n, -15 KB for 1,800 more pruned values; README "Pruning"), which is
    what makes the exact contract cost ~13 compressions at record size and this one 1-3.

Either way the answer's size is a real compression's (<= target) and the probe sequence is a pure
function of the inputs (the codecs are deterministic), so reruns give the same n and the same bytes.
Measured on the record-size synthetic model of bench/bench_quant_loop.py (bench/results/): see
the README ("Pruning"). Without a predictor the proxy is P(n) = -n and the first probe after
size(0) is size(total), the earlier plain bracketing search.
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


class Entropy:
    """P(n): order-0 entropy in bytes of the code tensors after pruning the n cheapest candidates.

    Only the counts of the codes -1, 0 and +1 of a tensor change with n; each tensor keeps its
    byte histogram and the sorted global ranks of its +1 and -1 candidates, so P(n) costs two
    binary searches per tensor.
    """

    def __init__(self, codes: dict[str, torch.Tensor], cands: Candidates):
        self.const, self.base, self.ranks, self.numel = [], [], [], []
        for name in cands.names:
            q = codes[name].reshape(-1)  # (numel,) int8
            hist = np.bincount((q.numpy().astype(np.int16) + 128), minlength=256).astype(np.float64)  # (256,)
            n = float(q.numel())
            rest = np.delete(hist, [127, 128, 129])  # every code but -1, 0, +1
            self.const.append(float(_bits(rest, n).sum()))
            self.base.append((hist[127], hist[128], hist[129]))  # counts of -1, 0, +1
            sign = q[cands.flat[name]].numpy()  # (k,) ±1
            r = cands.rank[name].numpy()
            self.ranks.append((np.sort(r[sign < 0]), np.sort(r[sign > 0])))
            self.numel.append(n)

    def __call__(self, n: int) -> float:
        total = 0.0
        for const, (cm, c0, cp), (rm, rp), size in zip(self.const, self.base, self.ranks, self.numel):
            a, b = np.searchsorted(rm, n), np.searchsorted(rp, n)  # -1 and +1 codes zeroed
            total += const + float(_bits(np.array([cm - a, c0 + a + b, cp - b]), size).sum())
        return total / 8.0


def _bits(counts: np.ndarray, n: float) -> np.ndarray:
    """-c log2(c / n) per count (0 for c = 0)."""
    c = counts[counts > 0]
    return -c * np.log2(c / n)


@dataclass
class SearchResult:
    n: int  # candidates pruned
    size: int  # size(n)
    probes: list[tuple[int, int]] = field(default_factory=list)  # (n, size) in the order evaluated


def _first_at_or_below(P: Callable[[int], float], value: float, a: int, b: int) -> int:
    """Smallest n in [a, b] with P(n) <= value (P nonincreasing), or b when none is."""
    while a < b:
        m = (a + b) // 2
        if P(m) <= value:
            b = m
        else:
            a = m + 1
    return b


def search(size_of: Callable[[int], int], total: int, target: int, predict: Callable[[int], float] | None = None,
           slack: int = 0) -> SearchResult:
    """n in [0, total] with size_of(n) <= target, by the module docstring's contract for `slack`."""
    probes: list[tuple[int, int]] = []

    def f(n: int) -> int:
        s = int(size_of(n))
        probes.append((n, s))
        return s

    s0 = f(0)
    if s0 <= target:
        return SearchResult(0, s0, probes)
    P = predict or (lambda n: -float(n))
    lo, s_lo, hi, s_hi = 0, s0, None, None
    if predict is None or total == 0:
        hi, s_hi = total, (f(total) if total > 0 else s0)
        if total == 0 or s_hi > target:
            _unreachable(target, total, s_hi, s0)
    y_lo, y_hi = float(s_lo), float(s_hi if s_hi is not None else 0)  # the line's ends (Illinois-scaled)
    k, guard, kept, widths = 1.0, slack // 2, "", [total]
    while True:
        if hi is not None and (hi - lo <= 1 or slack > 0):
            return SearchResult(hi, s_hi, probes)
        aim = target - guard
        if hi is None:  # no fit yet: the calibrated line from lo
            n = _first_at_or_below(P, P(lo) - (s_lo - aim) / k, lo + 1, total)
        elif len(widths) >= 4 and hi - lo > widths[-4] // 2:
            n = (lo + hi) // 2  # three probes did not halve the bracket: bisect once
        else:  # where the line between the bracket ends crosses the aim
            frac = (y_lo - aim) / max(y_lo - y_hi, 1e-9)
            n = _first_at_or_below(P, P(lo) + frac * (P(hi) - P(lo)), lo + 1, hi - 1)
        s = f(n)
        if hi is None and n < total:
            dp = P(lo) - P(n)
            k = (s_lo - s) / dp if dp > 0 and s_lo > s else k  # compressed bytes per entropy byte
        if s <= target:
            if hi is not None and kept == "lo":
                y_lo = target + (y_lo - target) / 2  # Illinois: lo stayed twice, pull the line to it
            hi, s_hi, y_hi, kept = n, s, float(s), "lo"
        else:
            if n == total:
                _unreachable(target, total, s, s0)
            if hi is not None and kept == "hi":
                y_hi = target - (target - y_hi) / 2
            guard = max(2 * guard, 64) if hi is None else guard
            lo, s_lo, y_lo, kept = n, s, float(s), "hi"
        widths.append((hi if hi is not None else total) - lo)


def _unreachable(target: int, total: int, smallest: int, unpruned: int):
    raise PruneError(f"compress.target_bytes={target:,} is unreachable: pruning all {total:,} ±1 values "
                     f"gives {smallest:,} bytes (smallest reachable size; unpruned {unpruned:,})")
