"""GPU micro-benchmark of the record model's training step (for the lead; needs CUDA).

Measures compiled forward+backward time per step of GPT(ModelConfig()) under bf16 autocast for
the variants that cost time: QAT off/on (the buffer flip must not recompile), online Hessians,
fused MLP, FA3 vs SDPA. Prints one JSON line per variant plus the recompile count.

    python -m bench.model_step --batch 48 --seq 2048 --steps 20   (from the repo root)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pgolf.config import ModelConfig
from pgolf.model import GPT, HAS_FA3


def time_steps(step, steps: int) -> float:
    """Mean ms per call of `step` after 3 warm-up calls."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._inductor.config.emulate_precision_casts = True  # keep int6's fp16 scale rounding
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = GPT(ModelConfig()).cuda()
    x = torch.randint(0, 1024, (args.batch, args.seq), device="cuda")
    y = torch.randint(0, 1024, (args.batch, args.seq), device="cuda")
    model.arm_qat()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    hess = model.zero_hessians()

    def step(hessians=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(x, y, hessians)
        loss.backward()
        model.zero_grad(set_to_none=True)

    variants = [("baseline", {}), ("qat_on", {"qat": True}), ("hessians", {"hess": True})]
    variants.append(("fused_mlp", {"fused": True}))
    if HAS_FA3:
        variants.append(("sdpa_instead_of_fa3", {"fa3": False}))
    for name, opt in variants:
        model.set_qat(opt.get("qat", False))
        model.use_fused_mlp = opt.get("fused", False)
        if HAS_FA3:
            model.use_fa3 = opt.get("fa3", True)
        graphs0 = counters["stats"]["unique_graphs"]
        ms = time_steps(lambda: step(hess if opt.get("hess") else None), args.steps)
        print(json.dumps({"variant": name, "ms_per_step": round(ms, 2), "tokens": args.batch * args.seq,
                          "new_graphs": counters["stats"]["unique_graphs"] - graphs0, "fa3": HAS_FA3}))


if __name__ == "__main__":
    main()
