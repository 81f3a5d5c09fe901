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

The asymmetric form (quantize.lqer_asym; PR #1797's, as PR #2135 runs it) splits the SVD unevenly,
A = U_r S_r (out, r) and B = V_r^T (r, in), and gives the two factors different codes: A 2-bit
codes in [-2, 1] with one fp16 scale for the whole factor (max|A| / 1.5), B 4-bit codes in [-8, 7]
with one fp16 scale per group of `group` consecutive values of B flattened row-major
(max|group| / 7.5). It needs r * in divisible by `group`; quantize uses the symmetric form for a
matrix where it is not. Same tensor names, other shapes; the quant entry carries
{"lqer": {"rank", "form": "asym", "group"}}:
    name.lqer_a (out, r) int8, name.lqer_a_scale (1,) fp16, name.lqer_b (r, in) int8,
    name.lqer_b_scale (r * in / group,) fp16
"""

from __future__ import annotations

import torch

SUFFIXES = (".lqer_a", ".lqer_a_scale", ".lqer_b", ".lqer_b_scale")
FP16_TINY = 2.0 ** -14  # smallest normal fp16: scales never round to 0
ASYM = "asym"  # the quant entry's "form" of the asymmetric factors
A_LOW, A_HIGH, A_RANGE = -2, 1, 1.5  # asymmetric A: 2-bit codes, scale = max|A| / A_RANGE
B_LOW, B_HIGH, B_RANGE = -8, 7, 7.5  # asymmetric B: 4-bit codes, scale = max|group| / B_RANGE


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
    _check_block(tensors, name, want, shape, rank)
    a = tensors[name + ".lqer_a"].float() * tensors[name + ".lqer_a_scale"].float()[:, None]  # (out, r)
    b = tensors[name + ".lqer_b"].float() * tensors[name + ".lqer_b_scale"].float()[:, None]  # (r, in)
    return a @ b


def _check_block(tensors: dict[str, torch.Tensor], name: str, want: dict[str, tuple], shape: tuple[int, int],
                 rank: int) -> None:
    """LQERError unless every suffix of `want` is in `tensors` with its shape."""
    for suffix, shp in want.items():
        t = tensors.get(name + suffix)
        if t is None:
            raise LQERError(f"LQER block of {name!r} lacks {name + suffix!r}")
        if tuple(t.shape) != shp:
            raise LQERError(f"LQER block of {name!r}: {suffix[1:]} has shape {tuple(t.shape)}, expected {shp} "
                            f"for a {shape[0]}x{shape[1]} matrix at rank {rank}")


def select(errors: dict[str, float], k: int) -> list[str]:
    """The k names of largest error (ties: name order), in `errors` order."""
    top = set(sorted(errors, key=lambda n: (-errors[n], n))[:k])
    return [n for n in errors if n in top]


# ----------------------------------------------------------------------------- asymmetric form


def factorize_us(err: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """err (out, in) -> A = U_r S_r (out, r), B = V_r^T (r, in): the uneven split of the asymmetric form."""
    U, S, Vh = torch.linalg.svd(err.double(), full_matrices=False)  # (out, k), (k,), (k, in)
    r = min(rank, S.numel())
    return (U[:, :r] * S[:r]).float(), Vh[:r].float()


def asym_fits(rank: int, shape: tuple[int, int], group: int) -> bool:
    """Whether the asymmetric form can store a rank-`rank` correction of a `shape` matrix."""
    return (min(rank, *shape) * shape[1]) % group == 0


def quantize_asym(A: torch.Tensor, B: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """A (out, r), B (r, in) -> qa (out, r) int8 in [-2, 1], sa (1,) fp16, qb (r, in) int8 in [-8, 7],
    sb (r * in / group,) fp16 (module docstring)."""
    sa = (A.abs().amax() / A_RANGE).clamp_min(FP16_TINY).half().reshape(1)  # (1,)
    qa = torch.clamp(torch.round(A / sa.float()), A_LOW, A_HIGH).to(torch.int8)  # (out, r)
    Bg = B.reshape(-1, group)  # (r * in / group, group)
    sb = (Bg.abs().amax(dim=1) / B_RANGE).clamp_min(FP16_TINY).half()  # (n_groups,)
    qb = torch.clamp(torch.round(Bg / sb.float()[:, None]), B_LOW, B_HIGH).to(torch.int8).reshape(B.shape)
    return qa, sa, qb, sb


def dequantize_asym(qa, sa, qb, sb) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `quantize_asym`: (A (out, r), B (r, in)) in fp32."""
    group = qb.numel() // sb.numel()
    a = qa.float() * sa.float()  # (out, r)
    b = (qb.reshape(-1, group).float() * sb.float()[:, None]).reshape(qb.shape)  # (r, in)
    return a, b


def pack_asym(name: str, err: torch.Tensor, rank: int, group: int) -> dict[str, torch.Tensor]:
    """The artifact tensors of the asymmetric rank-`rank` correction of `err` (out, in); the caller
    checks `asym_fits` first."""
    return dict(zip((name + s for s in SUFFIXES), quantize_asym(*factorize_us(err, rank), group)))


def correction_asym(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], rank: int,
                    group: int) -> torch.Tensor:
    """deq(A) deq(B) (out, in) of the asymmetric block of `name`; LQERError when it does not fit."""
    out, inp = shape
    if group < 1 or (rank * inp) % group:
        raise LQERError(f"LQER block of {name!r}: group {group} does not divide rank {rank} x {inp} values")
    want = {".lqer_a": (out, rank), ".lqer_a_scale": (1,), ".lqer_b": (rank, inp),
            ".lqer_b_scale": (rank * inp // group,)}
    _check_block(tensors, name, want, shape, rank)
    a, b = dequantize_asym(*(tensors[name + s] for s in SUFFIXES))
    return a @ b


# ----------------------------------------------------------------------------- either form


def pack_for(name: str, err: torch.Tensor, rank: int, bits: int, group: int = 0) -> tuple[dict, dict]:
    """(artifact tensors, quant entry) of the correction of `err` (out, in): the asymmetric form
    when `group` > 0 and it fits the matrix (`asym_fits`), else the symmetric one at `bits`."""
    r = min(rank, *err.shape)
    if group > 0 and asym_fits(rank, tuple(err.shape), group):
        return pack_asym(name, err, rank, group), {"rank": r, "form": ASYM, "group": group}
    return pack(name, err, rank, bits), {"rank": r, "bits": bits}


def correction_for(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], entry: dict) -> torch.Tensor:
    """deq(A) deq(B) (out, in) of `name`'s block in the form its quant entry `entry` names."""
    if entry.get("form") == ASYM:
        return correction_asym(tensors, name, shape, entry["rank"], entry["group"])
    return correction(tensors, name, shape, entry["rank"])
