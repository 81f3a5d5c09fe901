"""Benchmark the fused q/k norm + RoPE + gain kernel against inductor's code for the same maths.

GPU:  python -m bench.bench_qk_norm_rope --out qk.json   (48 x 2048 tokens, hd 64, rd 16, bf16)
CPU:  python -m bench.bench_qk_norm_rope --dry --out /tmp/qk.json   (Triton interpreter, tiny)

For q (8 heads, with the gain) and k (4 heads, no gain): forward and forward+backward of
`norm_rope` compiled by torch.compile under bf16 autocast and cast down to bf16 (what the
attention receives in the training graph), and of `fused_qk_norm_rope`; medians from
bench.timing.kernel_ms, the bytes that must move (x in, out; backward: x, g in, dx out), the
achieved GB/s, and the fused result's error against the fp32 eager value. Then the two kernels
alone at each launch configuration of SWEEP (BLOCK_R, NUM_WARPS in the kernel module).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

if "--dry" in sys.argv:  # must precede the first import of triton's jit decorators
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from bench.bench_kernels import rel  # noqa: E402
from bench.timing import kernel_ms  # noqa: E402
from pgolf.shared.io import write_json  # noqa: E402
from pgolf.shared.kernels.qk_norm_rope import fused_qk_norm_rope, launch_bwd, launch_fwd  # noqa: E402
from pgolf.shared.model import Rotary, norm_rope  # noqa: E402


SWEEP = [(r, w) for r in (16, 32, 64, 128) for w in (2, 4, 8)]  # (rows per program, warps)


def inductor_version(x, cos, sin, gain):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        return norm_rope(x, cos, sin, gain).to(x.dtype)


def case(name, B, T, H, hd, rd, with_gain, dev, bench, compiled):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, hd, generator=gen).to(dev, torch.bfloat16).requires_grad_()  # (B, T, H, hd)
    g = torch.randn(B, T, H, hd, generator=gen).to(dev, torch.bfloat16)
    gain = (1.5 + torch.rand(H, generator=gen)).to(dev).requires_grad_() if with_gain else None
    cos, sin = (t.to(dev) for t in Rotary(rd, 10000.0, T)(T, torch.device("cpu")))  # (T, rd/2)
    leaves = [x] + ([gain] if with_gain else [])
    nbytes = x.numel() * x.element_size()
    out = {"shape": [B, T, H, hd], "rope_dims": rd, "gain": with_gain,
           "bytes_fwd": 2 * nbytes, "bytes_fwd_bwd": 5 * nbytes}
    want = norm_rope(x.float(), cos, sin, gain).detach()
    for label, fn in (("inductor", compiled), ("fused", fused_qk_norm_rope)):
        fwd = bench(lambda: fn(x, cos, sin, gain))
        both = bench(lambda: fn(x, cos, sin, gain).backward(g), grad_to_none=leaves)
        out[label] = {"fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(both, 4),
                      "fwd_gbps": round(out["bytes_fwd"] / fwd / 1e6, 1),
                      "fwd_bwd_gbps": round(out["bytes_fwd_bwd"] / both / 1e6, 1),
                      "err_out_vs_fp32": rel(fn(x, cos, sin, gain).detach(), want)}
    out["launch_configs"] = sweep(x.detach().reshape(-1, hd), g.reshape(-1, hd), cos, sin,
                                  None if gain is None else gain.detach(), H, bench, nbytes)
    out["speedup_fwd_bwd"] = round(out["inductor"]["fwd_bwd_ms"] / out["fused"]["fwd_bwd_ms"], 3)
    print(f"{name}: inductor {out['inductor']['fwd_ms']:.3f}/{out['inductor']['fwd_bwd_ms']:.3f} ms, "
          f"fused {out['fused']['fwd_ms']:.3f}/{out['fused']['fwd_bwd_ms']:.3f} ms (fwd / fwd+bwd)")
    return out


def sweep(x, g, cos, sin, gain, heads, bench, nbytes):
    """The two kernels alone at each (rows per program, warps): ms and GB/s, fwd and bwd."""
    out, dx = torch.empty_like(x), torch.empty_like(x)  # (R, hd)
    rows = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    res = []
    for block_r, warps in SWEEP:
        fwd = bench(lambda: launch_fwd(x, cos, sin, gain, heads, out, block_r, warps))
        bwd = bench(lambda: launch_bwd(x, g, cos, sin, gain, heads, dx, rows if gain is not None else None,
                                       block_r, warps))
        res.append({"block_r": block_r, "num_warps": warps, "fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4),
                    "fwd_gbps": round(2 * nbytes / fwd / 1e6, 1), "bwd_gbps": round(3 * nbytes / bwd / 1e6, 1)})
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--dry", action="store_true", help="CPU Triton interpreter at tiny shapes")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 48; dry 2)")
    args = ap.parse_args()
    if not args.dry and not torch.cuda.is_available():
        sys.exit("bench_qk_norm_rope: no CUDA device (use --dry for the CPU interpreter)")
    dev = "cpu" if args.dry else "cuda"
    B, T = args.batch or (2 if args.dry else 48), 16 if args.dry else 2048
    compiled = inductor_version if args.dry else torch.compile(inductor_version, fullgraph=True)
    bench = functools.partial(kernel_ms, interpreted=args.dry)
    t0 = time.perf_counter()
    info = {"device": torch.cuda.get_device_name() if not args.dry else "cpu (TRITON_INTERPRET)",
            "torch": torch.__version__, "triton": triton.__version__,
            "q": case("q", B, T, 8, 64, 16, True, dev, bench, compiled),
            "k": case("k", B, T, 4, 64, 16, False, dev, bench, compiled)}
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, info)


if __name__ == "__main__":
    main()
