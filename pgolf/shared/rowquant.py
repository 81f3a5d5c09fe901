"""Symmetric per-row integer quantization (2 to 8 bits: int6, int8, ...): the one clipping rule
shared by training-time fake quantization (QAT) and export (GPTQ, the int8 embedding, pruning).

Codes use `qmax = 2**(bits-1) - 1` levels each side (int6: [-31, 31], int8: [-127, 127]). A row's clip is the `quantile` of its absolute values (1.0 = row
max), its scale `s = max(clip / qmax, 1 / qmax)` rounded to fp16 (the stored dtype), and
`q = clamp(round(w / s), -qmax, qmax)`. QAT uses exactly `row_scale` + `fake_quant_values`, so the
weights trained under QAT are the weights the exporter sees (recipe-spec §4.8, §6.6). The
post-training alternative `sigma_scale` (quantize.clip_rule "sigma"; no QAT trains against it)
takes the clip from the row's standard deviation instead.
"""

from __future__ import annotations

import torch

FP16_SUBNORMAL = 2.0 ** -24  # the smallest positive fp16 value


def qmax_for(bits: int) -> int:
    """Levels each side of zero for `bits`-bit codes (bits as pgolf.config.BITS_RANGE allows)."""
    return 2 ** (bits - 1) - 1


def row_quantile_abs(w: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row `torch.quantile(|w|, q, dim=-1)` (linear interpolation), via a small top-k.

    w: (..., n) -> (...,). Exact match with torch.quantile; costs a top-k of the few largest
    values instead of a full sort, so it is cheap enough to run inside every QAT step.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"clip quantile must be in (0, 1], got {q}")
    a = w.abs().float()
    n = a.shape[-1]
    pos = q * (n - 1)
    lo = int(pos)  # floor index in ascending order
    frac = pos - lo
    k = n - lo  # values from index `lo` to the max
    top = torch.topk(a, k, dim=-1, largest=True, sorted=True).values  # (..., k) descending
    v_lo = top[..., k - 1]
    v_hi = top[..., max(k - 2, 0)]
    return v_lo + (v_hi - v_lo) * frac


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest fp16 value (ties to even), kept in fp32.

    Same result as `x.half().float()` for the normal fp16 range (scales here are >= 1/31), but
    written as mantissa arithmetic because torch.compile's inductor drops a `.half().float()`
    round trip: QAT under compile would otherwise use scales the exporter never stores.
    """
    mant, exp = torch.frexp(x)  # x = mant * 2**exp, 0.5 <= |mant| < 1
    return torch.ldexp(torch.round(mant * 2048.0) / 2048.0, exp.float())


def row_scale(w: torch.Tensor, quantile: float, qmax: int) -> torch.Tensor:
    """Per-row fp16-representable scale: (..., n) -> (...,) float32."""
    clip = row_quantile_abs(w, quantile) if quantile < 1.0 else w.abs().float().amax(dim=-1)
    s = torch.clamp(clip / qmax, min=1.0 / qmax)
    return fp16_round(s)


def sigma_scale(w: torch.Tensor, sigmas: float, qmax: int) -> torch.Tensor:
    """Per-row fp16-representable scale of the sigma clip rule (quantize.clip_rule "sigma", PR #2135's
    GPTQ): the clip is `sigmas` row standard deviations (unbiased), s = sigmas * std / qmax, with no
    1/qmax floor (only fp16's smallest subnormal, so an all-zero row keeps a usable scale).
    (..., n) -> (...,) float32; a `.half()` round trip, since subnormal scales are possible here."""
    s = (sigmas * w.float().std(dim=-1)) / qmax
    return s.clamp_min(FP16_SUBNORMAL).half().float()


def quantize(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes (int8 container): (..., n) with per-row scale (...,)."""
    return torch.clamp(torch.round(w.float() / scale[..., None]), -qmax, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


def fake_quant_values(w: torch.Tensor, quantile: float, qmax: int) -> torch.Tensor:
    """Q(w) = dequantize(quantize(w)) with the export's per-row scales, in w's dtype (no grad)."""
    w = w.detach()
    s = row_scale(w, quantile, qmax)
    return (torch.clamp(torch.round(w.float() / s[..., None]), -qmax, qmax) * s[..., None]).to(w.dtype)


def fake_quant(w: torch.Tensor, quantile: float, qmax: int) -> torch.Tensor:
    """Straight-through fake quantization: forward sees Q(w), gradients flow to w unchanged."""
    return w + (fake_quant_values(w, quantile, qmax) - w).detach()
