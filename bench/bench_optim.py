"""GPU timing of one Muon step for the record's banks (spec §3.9 shapes); prints one JSON line.

    python bench/bench_optim.py                      # 1 GPU: plain Muon and ParallelMuon (local path)
    torchrun --standalone --nproc_per_node=8 bench/bench_optim.py   # sharded ParallelMuon

Times, per step: reduce-scatter launch + sharded momentum/NS5/all-gather/apply (ParallelMuon),
and on one process also plain `Muon.step` and the NS5 alone on the full banks (bench.timing: the
host clock around each step, synchronised after it, as the collectives run on their own streams). Every rank gets
the same random gradients, so the numbers measure cost, not training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import call_ms, summary_ms  # noqa: E402
from pgolf.shared import dist as pdist  # noqa: E402
from pgolf.train.optim import Muon, ParallelMuon, zeropower_via_newtonschulz5, compiled_newtonschulz5  # noqa: E402

SHAPES = {  # record banks (11 layers, d=512, kv 256, MLP 3x) + BigramHash proj + VE proj
    "qo_bank": (22, 512, 512), "kv_bank": (22, 256, 512), "mlp_up_bank": (11, 1536, 512),
    "mlp_down_bank": (11, 512, 1536), "bigram_proj": (512, 128), "ve_proj": (256, 128),
}


def make_params(device) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(0)
    ps = []
    for shape in SHAPES.values():
        p = torch.nn.Parameter(torch.randn(*shape, device=device, generator=g) * 0.02)
        p.grad = torch.randn(*shape, device=device, generator=g) * 1e-3
        ps.append(p)
    return ps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile the NS5 (as training does)")
    ap.add_argument("--comm-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke run only")
    args = ap.parse_args()
    info = pdist.init(args.device)
    cuda = info.device.type == "cuda"
    kw = dict(lr=0.025, momentum=0.99, weight_decay=0.04, ns_steps=5, compile=args.compile)
    comm = torch.bfloat16 if args.comm_dtype == "bf16" else torch.float32  # bf16: as PR #1072
    pm = ParallelMuon(make_params(info.device), comm_dtype=comm, **kw)

    def time_ms(fn) -> dict:
        return summary_ms(call_ms(fn, args.steps, args.warmup, info.device, host=True))

    def parallel_step():
        pm.launch_reduce_scatters()
        pm.step()

    out = {"device": torch.cuda.get_device_name(info.device) if cuda else "cpu", "torch": torch.__version__,
           "world_size": info.world_size, "compile": args.compile, "comm_dtype": args.comm_dtype,
           "shapes": {k: list(v) for k, v in SHAPES.items()},
           "parallel_muon_step": time_ms(parallel_step)}
    if info.world_size == 1:
        m = Muon(make_params(info.device), **kw)
        out["muon_step"] = time_ms(m.step)
        ns = compiled_newtonschulz5() if args.compile else zeropower_via_newtonschulz5
        grads = [p.grad for p in m.param_groups[0]["params"]]
        out["ns5_only"] = time_ms(lambda: [ns(g, 5, 1e-7, torch.bfloat16) for g in grads])
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(info.device) / 2**30, 3)
    if info.is_main:
        print(json.dumps(out), flush=True)
    pdist.shutdown()


if __name__ == "__main__":
    main()
