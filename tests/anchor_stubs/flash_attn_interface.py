"""Test-only stand-in for FlashAttention-3's `flash_attn_interface`, so the anchor scripts import on
a CPU: both calls are exact (fp32) attention through SDPA. Never used by pgolf itself."""

import torch
import torch.nn.functional as F


def flash_attn_func(q, k, v, causal=True, **_):
    """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D), causal SDPA with grouped kv heads."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=True)
    return y.transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, causal=True, **_):
    """q (N, H, D), k/v (N, Hkv, D) packed; segment s is rows cu[s]:cu[s+1] (repeated ends = padding)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            out[a:b] = flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal=causal)[0]
    return out
