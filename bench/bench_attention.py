"""Causal GQA attention at the record shapes, forward+backward, per backend (needs CUDA).

    python -m bench.bench_attention --out bench/results/attention_h200.json

Shapes: (B, T, H, Hkv, hd) = (48 or 12, 2048, 8, 4, 64), bf16. Backends: SDPA flash, cuDNN and
memory-efficient (each with `enable_gqa` and with K/V repeated to H heads), and FlexAttention
with a causal block mask. Median ms of fwd+bwd (bench.timing.kernel_ms: triton.testing.do_bench)
and the max abs difference of each output from the flash backend's.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.timing import kernel_ms
from pgolf.shared.io import write_json


def sdpa_fn(backend, gqa: bool):
    def f(q, k, v):  # (B, H, T, hd), (B, Hkv, T, hd)
        if not gqa:
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return f


def flex_fn(T: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def f(q, k, v):
        return compiled(q, k, v, block_mask=mask, enable_gqa=True)
    return f


def time_fwd_bwd(fn, q, k, v) -> float:
    g = torch.randn_like(q)

    def step():
        out = fn(q, k, v)
        out.backward(g)
    return kernel_ms(step, warmup_ms=50, rep_ms=300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[48, 12])
    args = ap.parse_args()
    T, H, Hkv, hd = 2048, 8, 4, 64
    variants = {f"sdpa_{n}_{'gqa' if g else 'repeat'}": sdpa_fn(b, g)
                for n, b in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                             ("efficient", SDPBackend.EFFICIENT_ATTENTION)) for g in (True, False)}
    variants["flex_gqa"] = flex_fn(T)
    results = []
    for B in args.batches:
        torch.manual_seed(0)
        q = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, Hkv, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, Hkv, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ref = sdpa_fn(SDPBackend.FLASH_ATTENTION, False)(q, k, v).detach()
        flops = 4 * B * H * T * T * hd / 2 * 3.5  # causal fwd (2 GEMMs) + bwd (5 GEMMs)
        for name, fn in variants.items():
            try:
                err = (fn(q, k, v).detach() - ref).abs().max().item()
                ms = time_fwd_bwd(fn, q, k, v)
                row = {"batch": B, "variant": name, "ms_fwd_bwd": round(ms, 3),
                       "tflops": round(flops / ms / 1e9, 1), "max_abs_diff_vs_flash": err}
            except Exception as e:  # noqa: BLE001 - a backend that cannot run these shapes
                row = {"batch": B, "variant": name, "error": f"{type(e).__name__}: {str(e)[:160]}"}
            results.append(row)
            print(json.dumps(row), flush=True)
    write_json(args.out, {"what": "causal GQA attention fwd+bwd at the record shapes (T 2048, H 8, Hkv 4, hd 64, bf16)",
                          "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results})


if __name__ == "__main__":
    main()
