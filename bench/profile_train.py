"""pgolf's side of the throughput benchmark: the real training loop, timed and profiled (needs CUDA).

    python -m bench.profile_train --batch-tokens 786432 196608 --out bench/results/profile.json
    python -m bench.profile_train --data DIR ...     # challenge-format shards instead of random tokens

For each batch size: the record profile's model and train params (`profiles/record.yaml`,
`--set section.key=value` to change one) on one GPU with no warmdown (lr scale 1, so late QAT
stays off, as in the reference run beside it), `--warmup` compile-priming steps, `--steps`
training steps logged every `--log-every` steps, then `--profile-steps` steps under
torch.profiler. Reported per batch size:

* steady-state ms/step: the median over the logged intervals of (training clock at the end -
  at the start) / steps, intervals that hold a Hessian capture or the first step excluded
  (the method the reference's log lines allow); stalls: steps whose device time (CUDA events)
  exceeds 1.5x the median, with their kind; the device time of every Hessian-capture step;
* seconds from process start to the first training step (imports, build, compile, priming);
* the loss at every logged step (the curve), tokens/s, MFU as bench_train counts it, peak memory;
* the profile: top GPU kernels by time, GPU busy vs idle time per step, host time per call of
  each `pgolf.*` range (data, fwd, bwd, optimizer, ema, hessian). `--trace-dir` keeps the traces.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import statistics
import tempfile
import time

T_START = time.perf_counter()  # before the heavy imports: part of the time to the first step

from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench import overrides
from bench.bench_train import PEAK_BF16, flops_per_token, shard_paths, synthetic_data
from bench.timing import sync
from pgolf.shared import dist
from pgolf.config import ModelConfig, TrainConfig
from pgolf.shared.io import write_json
from pgolf.train.train import Trainer, check_inputs

FIRST_STEADY = 10  # the reference logs (and syncs) every step up to 10: compare from there on
PHASES = ("pgolf.fwd", "pgolf.bwd", "pgolf.optimizer", "pgolf.ema", "pgolf.data", "pgolf.hessian")


def record_configs(items: list[str], profile: str = "record") -> tuple[ModelConfig, TrainConfig]:
    """(model, train) of a profile (the record's by default) with `section.key=value` overrides
    (YAML values), checked."""
    cfgs = overrides.load(profile, overrides.parse(items, "--set"), "--set")
    return cfgs["model"], cfgs["train"]


def bench_config(cfg: TrainConfig, batch_tokens: int, args) -> TrainConfig:
    """One GPU (micro-batches: train.grad_accum_steps, 0 = auto: 8 of 48 x 2048 at 786,432 tokens), no wallclock
    cap or warmdown (scale 1: late QAT off), Hessians every 25 steps."""
    return dataclasses.replace(cfg, nproc_per_node=1, batch_tokens=batch_tokens,
                               warmup_steps=args.warmup, iterations=args.steps, max_wallclock_seconds=0.0,
                               warmdown_iters=0, warmdown_frac=0.0, checkpoint_every=0, log_every=args.log_every, val_tokens=65536,
                               hessian_every=0 if args.no_hessian else 25, hessian_start_scale=1.01)


def steady_state(marks: list[tuple[int, float]], kinds: list[str]) -> tuple[float, list[float]]:
    """Median ms/step over the intervals between logged steps (step, clock ms), skipping those
    that start before step FIRST_STEADY (first-step costs) and any that holds a Hessian step."""
    rates = []
    for (s0, t0), (s1, t1) in zip(marks, marks[1:]):
        if s0 < FIRST_STEADY or any(k == "h" for k in kinds[s0:s1]):
            continue
        rates.append((t1 - t0) / (s1 - s0))
    return (statistics.median(rates) if rates else float("nan")), [round(r, 2) for r in rates]


def _merge(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


def summarise_trace(trace: dict, steps: int, accum: int) -> dict:
    """Per-step figures (ms) from a Chrome trace of `steps` training steps ({} without kernels)."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        return {}
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    busy = _merge(spans)
    by_name: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in kernels:
        by_name[e["name"][:90]] += e["dur"]
        count[e["name"][:90]] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    gpu_ranges = [e for e in ev if e.get("cat") == "gpu_user_annotation" and e["name"] in PHASES]
    cpu_ranges = [e for e in ev if e.get("cat") == "user_annotation" and e["name"] in PHASES]
    gpu_phase: dict[str, float] = defaultdict(float)
    for r in gpu_ranges:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        gpu_phase[r["name"]] += _merge([(max(s, lo), min(e, hi)) for s, e in spans if s < hi and e > lo])
    cpu_phase: dict[str, list[float]] = defaultdict(list)
    for r in cpu_ranges:
        cpu_phase[r["name"]].append(r["dur"] / 1000.0)
    return {
        "wall_ms_per_step": round((end - start) / 1000.0 / steps, 2),
        "gpu_busy_ms_per_step": round(busy / 1000.0 / steps, 2),
        "gpu_idle_ms_per_step": round((end - start - busy) / 1000.0 / steps, 2),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "gpu_ms_per_step_by_phase": {k: round(v / 1000.0 / steps, 2) for k, v in sorted(gpu_phase.items())},
        "host_ms_per_call_by_phase": {k: round(statistics.median(v), 3) for k, v in sorted(cpu_phase.items())},
        "micro_steps_per_step": accum,
        "top_kernels": [{"name": n, "ms_per_step": round(t / 1000.0 / steps, 3), "calls_per_step": count[n] / steps,
                         "pct_of_busy": round(100.0 * t / busy, 2)} for n, t in top],
    }


def profile_steps(trainer: Trainer, n: int, trace_path: Path | None) -> dict:
    """Run `n` more training steps under torch.profiler; return the trace summary."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            trainer._step(trainer.step, 1.0, trainer.triggers.seq_len, None)
            sync(trainer.dev)
    return summarise_profiler(prof, n, trainer.split.accum, trace_path)


def summarise_profiler(prof, steps: int, accum: int, trace_path: Path | None) -> dict:
    """`summarise_trace` of a finished torch.profiler run over `steps` steps; the Chrome trace also
    gzipped to `trace_path` when given."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        raw = Path(f.name).read_bytes()
    if trace_path is not None:
        trace_path.write_bytes(gzip.compress(raw, 6))
    return summarise_trace(json.loads(raw), steps, accum)


def run_batch(mcfg: ModelConfig, cfg: TrainConfig, paths, info, args, trace_dir: Path | None, t_start: float) -> dict:
    trainer = Trainer(mcfg, cfg, paths, info, check_inputs(paths, mcfg, cfg))
    if args.no_hessian:  # a variant run: no Hessian capture at all (the loop forces one otherwise)
        trainer.hess.accumulations = 1
    marks: list[tuple[int, float]] = []
    first: list[float] = []

    def on_step(tr: Trainer) -> None:
        if not first:
            first.append(time.perf_counter() - t_start)
        if tr.step == 1 or tr.step % cfg.log_every == 0:
            marks.append((tr.step, tr.elapsed_ms))

    before_warmup = time.perf_counter() - t_start  # imports, data, model, optimizers
    trainer.warmup()
    if trainer.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train(on_step)
    med, rates = steady_state(marks, trainer.step_kind)
    dev_ms = trainer.step_ms
    typical = statistics.median(dev_ms[1:])
    stalls = [{"step": i + 1, "ms": round(t, 1), "kind": k} for i, (t, k) in enumerate(zip(dev_ms, trainer.step_kind))
              if t > 1.5 * typical]
    tps = cfg.batch_tokens / med * 1000.0
    out = {"batch_tokens": cfg.batch_tokens, "micro_batch": [trainer.split.micro_tokens // cfg.seq_len, cfg.seq_len],
           "grad_accum_steps": trainer.split.accum,
           "step_ms_steady": round(med, 2), "interval_ms_per_step": rates, "tokens_per_second": round(tps),
           "mfu": round(flops_per_token(trainer.model, mcfg, cfg.seq_len) * tps / PEAK_BF16, 4),
           "device_step_ms_median": round(typical, 2), "stalls": stalls,
           "capture_step_ms": [round(t, 1) for t, k in zip(dev_ms, trainer.step_kind) if k == "h"],
           "seconds_to_first_step": round(first[0], 1), "warmup_seconds": round(trainer.priming.seconds, 2),
           "warmup_step_seconds": trainer.priming.step_seconds, "seconds_before_warmup": round(before_warmup, 1),
           "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if trainer.cuda else None,
           "loss_curve": [[r["step"], round(r["train_loss"], 4)] for r in trainer.log.rows]}
    trace = trace_dir / f"trace_{cfg.batch_tokens}.json.gz" if trace_dir else None
    if args.profile_steps > 0:
        out["profile"] = profile_steps(trainer, args.profile_steps, trace)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=[786432, 196608])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--data", default=None, help="folder of challenge shards (default: random tokens)")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--no-hessian", action="store_true", help="skip Hessian capture (and its compile)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides of the profile, section.key=value")
    ap.add_argument("--profile", default="record", help="the profile trained (a name in profiles/ or a file)")
    ap.add_argument("--tokenizer", default=None, help="the shards' .model (default: the sp1024 one)")
    ap.add_argument("--inductor", nargs="*", default=[], help="torch._inductor.config overrides, key=value")
    ap.add_argument("--small", action="store_true", help="CPU smoke run of this script at a micro config")
    args = ap.parse_args()
    import yaml
    import torch._inductor.config as inductor_config

    for item in args.inductor:
        key, value = item.split("=", 1)
        obj, *path = key.split(".")
        target = inductor_config
        for name in [obj, *path][:-1]:
            target = getattr(target, name)
        setattr(target, key.split(".")[-1], yaml.safe_load(value))
    info = dist.init("cpu" if args.small else "cuda")
    mcfg, base = record_configs(args.set, args.profile)
    if args.small:
        mcfg = dataclasses.replace(mcfg, **overrides.SMALL_MODEL)
        base = dataclasses.replace(base, seq_len=128, compile=False)
    trace_dir = Path(args.trace_dir) if args.trace_dir else None
    import triton

    head = {"what": f"the {args.profile} profile's training loop on 1 GPU: steady state, stalls, loss curve, profile",
            "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "data": args.data or "random tokens",
            "overrides": args.set, "inductor": args.inductor}
    results = []
    tok = [Path(args.tokenizer)] if args.tokenizer else []
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            paths = shard_paths(Path(tmp), Path(args.data), mcfg, *tok)
        else:
            most = max(args.batch_tokens) * (args.steps + args.warmup + args.profile_steps + 2) + 1
            paths = synthetic_data(Path(tmp), mcfg, most, 0, *tok)
        for bt in args.batch_tokens:
            results.append(run_batch(mcfg, bench_config(base, bt, args), paths, info, args, trace_dir, T_START))
            r = results[-1]
            print(json.dumps({k: v for k, v in r.items() if k not in ("profile", "loss_curve", "interval_ms_per_step")}),
                  flush=True)
            if r.get("profile"):
                short = {k: v for k, v in r["profile"].items() if k != "top_kernels"}
                short["top6"] = [(k["name"][:40], k["ms_per_step"]) for k in r["profile"]["top_kernels"][:6]]
                print(json.dumps(short), flush=True)
            write_json(args.out, {**head, "results": results})  # after every batch size: a later crash keeps it


if __name__ == "__main__":
    main()
