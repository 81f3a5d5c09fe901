"""LQER: a low-rank correction of the quantization error, stored in low precision.

For a quantized matrix W (out, in) with dequantized Ŵ, the error E = W - Ŵ is approximated by its
best rank-r factors (truncated SVD, E ≈ U_r S_r V_r^T), split evenly as A = U_r sqrt(S_r) (out, r)
and B = sqrt(S_r) V_r^T (r, in), and both factors are stored as symmetric per-row integer codes of
`quantize.lqer_bits` with fp16 row scales (no scale floor, unlike pgolf.shared.rowquant: the factors are
small). The scored weight is Ŵ + deq(A) deq(B). The records (openai/parameter-golf PR #1797 →
#1855) correct the 3 tensors of largest ||E||_F at rank 4 with 4-bit factors; quantize picks the
`quantize.lqer_top_k` largest the same way.

Artifact tensors of a corrected matrix `name` (its quant entry carries {"lqer": {"rank", "bits"}}):
    name.lqer_a (out, r) int8, name.lqer_a_scale (out,) fp16, name.lqer_b (r, in) int8, name.lqer_b_scale (r,) fp16
"""

from __future__ import annotations

import torch

SUFFIXES = (".lqer_a", ".lqer_a_scale", ".lqer_b", ".lqer_b_scale")
FP16_TINY = 2.0 ** -14  # smallest normal fp16: scales never round to 0


class LQERError(ValueError):
    """An LQER block that does not fit its matrix."""


def factorize(err: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """err (out, in) -> A (out, r), B (r, in) with A B the best rank-r approximation, r = min(rank, out, in)."""
    U, S, Vh = torch.linalg.svd(err.double(), full_matrices=False)  # (out, k), (k,), (k, in)
    r = min(rank, S.numel())
    root = S[:r].sqrt()  # (r,)
    return (U[:, :r] * root).float(), (root[:, None] * Vh[:r]).float()


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, m) -> int8 codes in [-qmax, qmax] (n, m) and fp16 row scales (n,) = max|row| / qmax."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(dim=1) / qmax).clamp_min(FP16_TINY).half()  # (n,)
    q = torch.clamp(torch.round(x / s.float()[:, None]), -qmax, qmax).to(torch.int8)  # (n, m)
    return q, s


def pack(name: str, err: torch.Tensor, rank: int, bits: int) -> dict[str, torch.Tensor]:
    """The artifact tensors of the rank-`rank` correction of `err` (out, in) for matrix `name`."""
    A, B = factorize(err, rank)
    qa, sa = quantize_rows(A, bits)
    qb, sb = quantize_rows(B, bits)
    return dict(zip((name + s for s in SUFFIXES), (qa, sa, qb, sb)))


def correction(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], rank: int) -> torch.Tensor:
    """deq(A) deq(B) (out, in) from the block of `name`; LQERError when a piece is missing or misshapen."""
    out, inp = shape
    want = {".lqer_a": (out, rank), ".lqer_a_scale": (out,), ".lqer_b": (rank, inp), ".lqer_b_scale": (rank,)}
    for suffix, shp in want.items():
        t = tensors.get(name + suffix)
        if t is None:
            raise LQERError(f"LQER block of {name!r} lacks {name + suffix!r}")
        if tuple(t.shape) != shp:
            raise LQERError(f"LQER block of {name!r}: {suffix[1:]} has shape {tuple(t.shape)}, expected {shp} "
                            f"for a {out}x{inp} matrix at rank {rank}")
    a = tensors[name + ".lqer_a"].float() * tensors[name + ".lqer_a_scale"].float()[:, None]  # (out, r)
    b = tensors[name + ".lqer_b"].float() * tensors[name + ".lqer_b_scale"].float()[:, None]  # (r, in)
    return a @ b


def select(errors: dict[str, float], k: int) -> list[str]:
    """The k names of largest error (ties: name order), in `errors` order."""
    top = set(sorted(errors, key=lambda n: (-errors[n], n))[:k])
    return [n for n in errors if n in top]
