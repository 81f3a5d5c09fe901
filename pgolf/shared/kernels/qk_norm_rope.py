"""Fused q/k head norm + partial RoPE (+ the per-head query gain): one Triton kernel each way.

This module owns `fused_qk_norm_rope`, what the attention does to q and k between their
projections and the attention kernel (spec §3.4):

    out = rope(rms_norm(x)) * gain[h]       x (B, T, H, hd), per head over hd

rms_norm with eps = fp32 machine epsilon; rope rotates dims [0, rd) as halves x1 = [0, rd/2),
x2 = [rd/2, rd): (x1 c + x2 s, x2 c - x1 s), with cos/sin (T, rd/2) fp32 tables; dims [rd, hd)
pass. All of it in fp32, one read and one write of x's dtype, as `CausalSelfAttention` computes
it under autocast (rms_norm there runs in fp32 and the attention casts the result down).

* forward: each program normalises BLOCK_R rows of hd; the rotation's partner of column c
  (c + rd/2 or c - rd/2) is a second load of the same row's cache lines, so no column shuffle.
* backward: recomputes the rotated norm from x, writes dx, and one fp32 number per row,
  sum_c g * rope(norm(x)) — the gain's gradient is their per-head sum (one small torch sum).

Their timings against inductor's kernels: docs/performance.md (bench/results/qk_norm_rope_h200.json).

The launches are torch.library custom ops (opaque to Dynamo/Inductor) under an
autograd.Function, as in `fused_mlp`. Under TRITON_INTERPRET=1 (set before importing this
module) the kernels run on CPU tensors for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pgolf.shared.kernels.fused_mlp import check_runnable

BLOCK_R = 16  # rows of hd per program: the best of bench_qk_norm_rope's sweep (qk_norm_rope_h200.json)
NUM_WARPS = 4

# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _partner(cols, HALF: tl.constexpr):
    """The column each column rotates with: c + rd/2 on [0, rd/2), c - rd/2 on [rd/2, rd), else c."""
    return tl.where(cols < HALF, cols + HALF, tl.where(cols < 2 * HALF, cols - HALF, cols))


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, rows, cols, rmask, H, T, HALF: tl.constexpr):
    """-> cos (BR, HD) and +-sin (BR, HD): +sin on [0, rd/2), -sin on [rd/2, rd), 1 / 0 beyond."""
    t = (rows // H) % T  # (BR,) position of the row's token
    in_rope = cols < 2 * HALF
    freq = tl.where(cols < HALF, cols, cols - HALF)
    tmask = rmask[:, None] & in_rope[None, :]
    offs = t[:, None] * HALF + freq[None, :]
    c = tl.load(cos_ptr + offs, mask=tmask, other=1.0)
    s = tl.load(sin_ptr + offs, mask=tmask, other=0.0)
    return c, tl.where((cols < HALF)[None, :], s, -s)


@triton.jit
def _rotated_norm(x_ptr, cos_ptr, sin_ptr, rows, cols, R, H, T, eps,
                  HD: tl.constexpr, HALF: tl.constexpr):
    """-> (o, n, rstd, c, s): o = rope(n) (BR, HD) fp32, n = rms_norm(x) rows, rstd (BR,), and
    the rotation's cos / signed sin (BR, HD) from `_rope_tables`."""
    rmask = rows < R
    base = rows.to(tl.int64)[:, None] * HD  # (BR, 1)
    x = tl.load(x_ptr + base + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    xp = tl.load(x_ptr + base + _partner(cols, HALF)[None, :], mask=rmask[:, None],
                 other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)  # (BR,)
    n = x * rstd[:, None]
    c, s_signed = _rope_tables(cos_ptr, sin_ptr, rows, cols, rmask, H, T, HALF)
    return n * c + xp * rstd[:, None] * s_signed, n, rstd, c, s_signed


@triton.jit
def _qk_norm_rope_fwd_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, R, H, T, eps,
                             HD: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,) rows of (R, HD)
    cols = tl.arange(0, HD)
    o, _, _, _, _ = _rotated_norm(x_ptr, cos_ptr, sin_ptr, rows, cols, R, H, T, eps, HD, HALF)
    if HAS_GAIN:
        o = o * tl.load(gain_ptr + rows % H, mask=rows < R, other=0.0)[:, None]
    offs = rows.to(tl.int64)[:, None] * HD + cols[None, :]
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=(rows < R)[:, None])


@triton.jit
def _qk_norm_rope_bwd_kernel(x_ptr, g_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, dgain_ptr,
                             R, H, T, eps, HD: tl.constexpr, HALF: tl.constexpr,
                             HAS_GAIN: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,) rows of (R, HD)
    cols = tl.arange(0, HD)
    rmask = rows < R
    o, n, rstd, c, s_signed = _rotated_norm(x_ptr, cos_ptr, sin_ptr, rows, cols, R, H, T, eps,
                                            HD, HALF)
    base = rows.to(tl.int64)[:, None] * HD
    g = tl.load(g_ptr + base + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    gp = tl.load(g_ptr + base + _partner(cols, HALF)[None, :], mask=rmask[:, None],
                 other=0.0).to(tl.float32)
    if HAS_GAIN:
        tl.store(dgain_ptr + rows, tl.sum(g * o, axis=1), mask=rmask)  # d gain[h], row's share
        gain = tl.load(gain_ptr + rows % H, mask=rmask, other=0.0)[:, None]
        g = g * gain
        gp = gp * gain
    dn = g * c - gp * s_signed  # rope^T: the partner's share enters with the opposite sign
    dot = tl.sum(dn * n, axis=1) / HD  # (BR,)
    dx = rstd[:, None] * (dn - n * dot[:, None])
    tl.store(dx_ptr + base + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=rmask[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers (write into caller-provided outputs)


def _check(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, heads: int) -> None:
    """x (R, hd) contiguous, R = tokens * heads; cos/sin (T, rd/2) fp32 contiguous; gain (heads,)."""
    where = "fused_qk_norm_rope"
    check_runnable(x, cos, sin, *(() if gain is None else (gain,)), where=where)
    hd = x.shape[-1]
    if x.dim() != 2 or not x.is_contiguous() or hd & (hd - 1) or x.shape[0] % heads:
        raise ValueError(f"{where}: x must be a contiguous (tokens * {heads}, hd) matrix with hd a "
                         f"power of two, got {tuple(x.shape)} contiguous={x.is_contiguous()}")
    if cos.shape != sin.shape or cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"{where}: cos/sin must be contiguous fp32 (T, rd/2) tables, got "
                         f"{tuple(cos.shape)} {cos.dtype} and {tuple(sin.shape)} {sin.dtype}")
    if 2 * cos.shape[1] > hd:
        raise ValueError(f"{where}: rope dims {2 * cos.shape[1]} exceed head dim {hd}")
    if gain is not None and (gain.shape != (heads,) or gain.dtype != torch.float32):
        raise ValueError(f"{where}: gain must be fp32 ({heads},), got {tuple(gain.shape)} {gain.dtype}")


def launch_fwd(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, heads: int,
               out: Tensor, block_r: int = BLOCK_R, num_warps: int = NUM_WARPS) -> None:
    """out = rope(rms_norm(x)) * gain[row % heads]; x, out (R, hd); rows ordered (token, head)."""
    _check(x, cos, sin, gain, heads)
    R, hd = x.shape
    _qk_norm_rope_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, cos, sin, x if gain is None else gain, out, R, heads, max(cos.shape[0], 1),
        torch.finfo(torch.float32).eps, HD=hd, HALF=cos.shape[1], HAS_GAIN=gain is not None,
        BLOCK_R=block_r, num_warps=num_warps)


def launch_bwd(x: Tensor, g: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, heads: int,
               dx: Tensor, dgain_rows: Tensor | None, block_r: int = BLOCK_R,
               num_warps: int = NUM_WARPS) -> None:
    """dx = d out/d x^T g; dgain_rows (R,) fp32 = sum_c g * rope(rms_norm(x)) when gain is given."""
    _check(x, cos, sin, gain, heads)
    R, hd = x.shape
    _qk_norm_rope_bwd_kernel[(triton.cdiv(R, block_r),)](
        x, g, cos, sin, x if gain is None else gain, dx, dx if dgain_rows is None else dgain_rows,
        R, heads, max(cos.shape[0], 1), torch.finfo(torch.float32).eps, HD=hd, HALF=cos.shape[1],
        HAS_GAIN=gain is not None, BLOCK_R=block_r, num_warps=num_warps)


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to Dynamo/Inductor)


@torch.library.custom_op("pgolf::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, heads: int) -> Tensor:
    """(R, hd) in x's dtype."""
    out = torch.empty_like(x)
    launch_fwd(x, cos, sin, gain, heads, out)
    return out


@qk_norm_rope_op.register_fake
def _(x, cos, sin, gain, heads):
    return torch.empty_like(x)


@torch.library.custom_op("pgolf::qk_norm_rope_bwd", mutates_args=())
def qk_norm_rope_bwd_op(x: Tensor, g: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None,
                        heads: int) -> tuple[Tensor, Tensor]:
    """(dx (R, hd), dgain_rows (R,) fp32; empty without a gain)."""
    g = g.contiguous()
    dx = torch.empty_like(x)
    rows = torch.empty(x.shape[0] if gain is not None else 0, device=x.device, dtype=torch.float32)
    launch_bwd(x, g, cos, sin, gain, heads, dx, rows if gain is not None else None)
    return dx, rows


@qk_norm_rope_bwd_op.register_fake
def _(x, g, cos, sin, gain, heads):
    rows = x.new_empty(x.shape[0] if gain is not None else 0, dtype=torch.float32)
    return torch.empty_like(x), rows


# ----------------------------------------------------------------------------------------------
# Autograd and public API


class FusedQKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, gain, heads: int):
        # x (R, hd), cos/sin (T, rd/2), gain (heads,) or None
        ctx.heads, ctx.has_gain = heads, gain is not None
        ctx.save_for_backward(x, cos, sin, *(() if gain is None else (gain,)))
        return torch.ops.pgolf.qk_norm_rope(x, cos, sin, gain, heads)

    @staticmethod
    def backward(ctx, g):
        x, cos, sin, *gain = ctx.saved_tensors
        gain = gain[0] if ctx.has_gain else None
        dx, rows = torch.ops.pgolf.qk_norm_rope_bwd(x, g, cos, sin, gain, ctx.heads)
        dgain = rows.view(-1, ctx.heads).sum(0) if gain is not None else None  # (heads,)
        return dx, None, None, dgain, None


def fused_qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None = None) -> Tensor:
    """rope(rms_norm(x)) * gain per head; x (B, T, H, hd) -> the same shape and dtype.

    cos/sin (T', rd/2) with T' >= T (their first T rows are used); gain (H,) or None. The gain is
    taken in fp32 (a differentiable cast)."""
    B, T, H, hd = x.shape
    cos, sin = cos[:T].float().contiguous(), sin[:T].float().contiguous()  # (T, rd/2)
    if gain is not None:
        gain = gain.float()
    x2 = x.reshape(B * T * H, hd)  # (R, hd), rows ordered (b, t, h)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return FusedQKNormRope.apply(x2, cos, sin, gain, H).view(B, T, H, hd)

