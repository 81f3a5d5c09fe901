"""Timing of full GPTQ over every quantizable matrix of the record model; prints one JSON line.

    python bench/bench_gptq.py                     # record shapes (ModelConfig() defaults) on the GPU
    python bench/bench_gptq.py --small --device cpu  # a smoke test at a tiny config

Builds the 66 block matrices (11 layers x c_q, c_k, c_v, attn.proj, mlp.fc, mlp.proj) with random
weights and random SPD Hessians H = X^T X / n from random correlated activations (one X per
input: c_q/c_k/c_v share theirs, as in training), then times `pgolf.quantize.gptq.gptq_matrices` with
the stage's defaults (int6, damp 0.01, block 128, act-order, the 5 GPTQ-lite clip quantiles
plus the QAT one = 5 distinct candidates, per-row choice). The first run (cold: CUDA context,
cuBLAS/cuSOLVER handles) and the best of the timed repeats are reported separately.
Target on an H100/H200: <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overrides import SMALL_MODEL  # noqa: E402
from bench.timing import timed  # noqa: E402
from pgolf.config import ModelConfig, QuantizeConfig, TrainConfig  # noqa: E402
from pgolf.quantize.gptq import GPTQSpec, gptq_matrices  # noqa: E402
from pgolf.quantize.quantize import candidates  # noqa: E402
from pgolf.shared.rowquant import qmax_for  # noqa: E402


def shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """name -> (rows, cols) of the block matrices, in GPT.quantizable_names() order."""
    d, kv, hid = cfg.model_dim, cfg.model_dim // cfg.num_heads * cfg.num_kv_heads, cfg.mlp_hidden
    per = {"attn.c_q": (d, d), "attn.c_k": (kv, d), "attn.c_v": (kv, d), "attn.proj": (d, d),
           "mlp.fc": (hid, d), "mlp.proj": (d, hid)}
    return {f"blocks.{i}.{k}.weight": s for i in range(cfg.num_layers) for k, s in per.items()}


def random_hessian(n: int, rows: int, g: torch.Generator, device) -> torch.Tensor:
    """X^T X / rows for X = Z A + shared offset: strongly non-identity, SPD. -> (n, n) fp32."""
    A = torch.randn(n, n, generator=g, device=device) / n ** 0.5
    Z = torch.randn(rows, n, generator=g, device=device)
    X = Z @ A + 0.5 * torch.randn(rows, 1, generator=g, device=device)
    return X.T @ X / rows


def make_inputs(cfg: ModelConfig, device) -> tuple[dict, dict]:
    g = torch.Generator(device=device).manual_seed(0)
    weights, hessians, shared = {}, {}, {}
    for name, (r, c) in shapes(cfg).items():
        weights[name] = torch.randn(r, c, generator=g, device=device) * 0.5
        key = name.rsplit(".", 2)[0] if ".attn.c_" in name else name  # q/k/v share one input
        if key not in shared:
            shared[key] = random_hessian(c, 2 * c, g, device)
        hessians[name] = shared[key]
    return weights, hessians


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny config (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()

    cfg = ModelConfig(**SMALL_MODEL) if args.small else ModelConfig()
    q = QuantizeConfig()
    quantiles = candidates(q, TrainConfig().qat_clip_quantile)  # the quantize stage's: clip_quantiles + QAT's
    spec = GPTQSpec(qmax=qmax_for(q.bits), quantiles=quantiles, damp=q.damp, block_size=q.block_size,
                    act_order=q.act_order)
    weights, hessians = make_inputs(cfg, args.device)
    times = []
    for _ in range(1 + args.repeats):
        res, seconds = timed(gptq_matrices, weights, hessians, spec, args.device, sync_device=args.device)
        times.append(seconds)
    err = sum(r.err for r in res.values())
    err_rtn = sum(r.err_rtn for r in res.values())
    out = {
        "bench": "gptq", "config": "small" if args.small else "record", "matrices": len(weights),
        "params": sum(w.numel() for w in weights.values()), "candidates": len(quantiles),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "seconds_first": round(times[0], 3), "seconds": round(min(times[1:]), 3),
        "seconds_all": [round(t, 3) for t in times],
        "error_ratio_vs_rtn": round(err / err_rtn, 4),
        "damping_retries": sum(r.damp_retries for r in res.values()),
        "target_seconds": 10.0,
    }
    line = json.dumps(out)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
