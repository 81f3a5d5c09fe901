"""Compile time of the training forward+backward, by `train.compile_scope`, cold and warm.

    python -m bench.bench_compile --out bench/results/compile_cpu.json                 # CPU, record model
    python -m bench.bench_compile --backend inductor --batch 48x2048 --out ...gpu.json # on a GPU

For each scope (`model`: one graph; `blocks`: regional compilation, pgolf.train.train.compile_forward)
a fresh process builds the profile's model, compiles it with `--backend`, and times the first
forward+backward (trace + build + run) and the next `--steps` (run only). Each scope runs twice
on one scratch compile cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR): first cold, then warm,
as a rerun of the train stage on the same machine would find it. Recorded per run: the first
step's seconds, the median later step, dynamo's graph count, AOTAutograd's on-disk cache counts
(hit, miss, bypass), and dynamo's own timings of its phases (tracing, AOTAutograd, the backend).
`aot_eager` stops after AOTAutograd (no kernels are generated): the front-end cost, which is the
same on every device; `inductor` adds kernel generation and the compile of the kernels (C++ on
a CPU, Triton on a GPU), which is where devices differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import overrides
from bench.bench_eval import versions
from bench.timing import timed

REPO = Path(__file__).resolve().parents[1]
SCOPES = ("model", "blocks")
PHASES = ("bytecode_tracing", "OutputGraph.call_user_compiler", "create_aot_dispatcher_function",
          "aot_trace_joint_graph", "compile_fx_inner", "backward._backward_impl")


def parse_batch(text: str) -> tuple[int, int]:
    """'BxT' -> (B, T)."""
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--batch must be BxT (e.g. 1x128), got {text!r}") from None
    if b < 1 or t < 1:
        raise SystemExit(f"--batch must be BxT with B, T >= 1, got {text!r}")
    return b, t


def measure(profile: str, scope: str, backend: str, batch: tuple[int, int], steps: int) -> dict:
    """In this process: build, compile, and time the first and later forward+backward passes."""
    import torch
    from torch._dynamo.utils import compile_times, counters

    from pgolf.shared.model import GPT
    from pgolf.train.train import compile_forward, use_cuda_training_kernels

    cfgs = overrides.load(profile)
    mcfg = cfgs["model"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(mcfg, train_seq_len=batch[1]).to(dev)
    if dev.type == "cuda":  # as the trainer runs it
        use_cuda_training_kernels(model, cfgs["train"])
    fwd = compile_forward(model, scope, backend=backend)
    x = torch.randint(0, mcfg.vocab_size, batch, device=dev)  # (B, T)
    cuda = dev.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def fwd_bwd() -> None:
        with autocast:
            loss = fwd(x, x)
        loss.backward()

    first = timed(fwd_bwd, sync_device=dev)[1]  # trace + build + run
    later = [timed(fwd_bwd, sync_device=dev)[1] for _ in range(steps)]
    names, seconds = compile_times(repr="csv", aggregate=True)
    return {"first_step_seconds": round(first, 2), "later_step_seconds": round(statistics.median(later), 4),
            "graphs": counters["stats"]["unique_graphs"],
            "aot_autograd_cache": {k.removeprefix("autograd_cache_"): v for k, v in counters["aot_autograd"].items()
                                   if k.startswith("autograd_cache_")},
            "phase_seconds": {k: round(float(v), 2) for k, v in zip(names, seconds) if k in PHASES}}


def run_child(args, scope: str, cache: Path) -> dict:
    """One measurement in a fresh process on the compile cache `cache`."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    cmd = [sys.executable, "-m", "bench.bench_compile", "--child", scope, "--profile", str(args.profile),
           "--backend", args.backend, "--batch", args.batch, "--steps", str(args.steps)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_compile: the {scope} run failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    overrides.add_profile_argument(ap, "its model is built, with its train section's CUDA kernels")
    ap.add_argument("--backend", default="aot_eager", choices=("aot_eager", "inductor"))
    ap.add_argument("--batch", default="1x128", help="BxT of the timed forward+backward")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    ap.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated train.compile_scope values")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", choices=SCOPES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batch = parse_batch(args.batch)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if args.child:
        print(json.dumps(measure(args.profile, args.child, args.backend, batch, args.steps)))
        return
    scopes = [s.strip() for s in args.scopes.split(",")]
    if bad := [s for s in scopes if s not in SCOPES]:
        raise SystemExit(f"--scopes: unknown {bad}; choose from {', '.join(SCOPES)}")
    host = {**versions(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    source, _ = overrides.resolve(args.profile)  # a bad profile stops before any run
    if Path(args.profile).suffix:  # a file: the runs start in REPO
        args.profile = str(Path(args.profile).resolve())
    result = {"profile": source, "backend": args.backend, "batch": list(batch), "versions": host, "runs": {}}
    for scope in scopes:
        with tempfile.TemporaryDirectory(prefix="pgolf-compile-") as cache:
            cold = run_child(args, scope, Path(cache))
            warm = run_child(args, scope, Path(cache))
        result["runs"][scope] = {"cold": cold, "warm": warm}
        print(f"{scope}: cold {cold['first_step_seconds']} s, warm {warm['first_step_seconds']} s, "
              f"{cold['graphs']} graphs, later step {warm['later_step_seconds']} s", flush=True)
        if args.out:  # after every scope: a run cut short keeps the scopes before it
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
