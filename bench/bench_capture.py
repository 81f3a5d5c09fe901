"""What one online Hessian capture costs on a GPU, and where that time goes.

    python -m bench.bench_capture --compiled --out bench/results/capture_h200.json   # on a GPU

A compiled training step captures Hessians with one extra eager no-grad forward of its first
micro-batch (pgolf.train.train.Trainer._capture_hessians): every quantizable matrix's input X
adds X^T X to its Hessian (pgolf.shared.model.accumulate_gram). On one H200 at 196,608 tokens
per step (2 micro-batches of 48 x 2048) such a step took 327-336 ms against 151 ms
(bench/results/vs_ref_h200_machine5_196k.json). This bench builds the profile's model as the trainer
does (fp32 weights, bf16 autocast, TF32, fused MLP) and times, with CUDA events (bench.timing:
the median of `--repeats` after two warm-up calls), on one `--batch` of random tokens:

* `forward`: the eager no-grad forward and loss, no capture;
* `capture`: the same forward with capture;
* `capture_hidden`: the capture forward stopped at the final norm (no logits, no loss: the
  trainer's capture call);
* `grams`: accumulate_gram alone on random bf16 inputs of the captured shapes, by gram variant:
  `fp32` (the inputs cast to fp32, TF32 GEMM) and `bf16_out_fp32` (a bf16 GEMM that accumulates
  and returns fp32, torch.mm's out_dtype);
* `capture_compiled` (with --compiled): the capture forward under torch.compile (its compile
  seconds too).

and the capture's top kernels by device time from torch.profiler. Meant for a GPU; on a CPU
(the tests) the same calls are timed by the host clock, the profile lists CPU ops, and a gram
variant the CPU lacks is reported as unsupported.

bench/results/capture_h200_machine6.json was measured on the tree between 75945f6 and d99f58a,
before accumulate_gram took the grams of the autocast-dtype rows: its captures still multiplied
fp32 rows in fp64.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

from bench import overrides
from bench.bench_eval import versions
from bench.timing import median_ms, timed


def gram_fp32(x2: torch.Tensor) -> torch.Tensor:
    """x2 (M, n) bf16 -> (n, n) fp32: cast, then an fp32 (TF32) GEMM."""
    x2 = x2.float()
    return x2.t() @ x2


def gram_bf16_out_fp32(x2: torch.Tensor) -> torch.Tensor:
    """x2 (M, n) bf16 -> (n, n) fp32: one bf16 GEMM with fp32 accumulation and output."""
    return torch.mm(x2.t(), x2, out_dtype=torch.float32)


GRAMS = {"fp32": gram_fp32, "bf16_out_fp32": gram_bf16_out_fp32}


def top_kernels(fn, n: int = 15) -> dict:
    """torch.profiler over one call of fn: the `n` kernels (CPU: ops) with the most device time,
    and totals."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [e for e in prof.events() if e.device_type == kind]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time if cuda else e.self_cpu_time_total)
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:n]
    return {"kernels": len(kernels), "device_ms": round(sum(sum(v) for v in by_name.values()) / 1000.0, 3),
            "top": [{"name": k[:100], "ms": round(sum(v) / 1000.0, 3), "calls": len(v)} for k, v in rows]}


def build(profile: str, batch: tuple[int, int], dev: torch.device):
    """The profile's model as the trainer builds it, and one random batch (x, y)."""
    from pgolf.shared.model import GPT
    from pgolf.train.train import use_cuda_training_kernels

    cfgs = overrides.load(profile)
    mcfg, tcfg = cfgs["model"], cfgs["train"]
    torch.manual_seed(0)
    model = GPT(mcfg, qat_quantile=tcfg.qat_clip_quantile, train_seq_len=batch[1]).to(dev)
    if dev.type == "cuda":
        use_cuda_training_kernels(model, tcfg)
    x = torch.randint(0, mcfg.vocab_size, batch, device=dev)  # (B, T)
    return model, x, torch.roll(x, -1, dims=1)


def measure(args) -> dict:
    import pgolf.shared.model as M

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, x, y = build(args.profile, args.batch, dev)
    hess = model.zero_hessians()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    def run(fn):
        def call():
            with torch.no_grad(), autocast:
                fn()
        return call

    calls = {"forward": run(lambda: model(x, y)),
             "capture": run(lambda: model(x, y, hessians=hess)),
             "capture_hidden": run(lambda: model.forward_hidden(x, hess))}
    out = {"ms": {name: median_ms(fn, args.repeats, device=dev) for name, fn in calls.items()}}
    rows = args.batch[0] * args.batch[1]
    widths = sorted(set(model.hessian_shapes().values()))
    counts = _gram_calls(model)  # width -> accumulate_gram calls per capture
    out["grams_ms"] = {}
    inputs = {w: torch.randn(rows, w, device=dev, dtype=torch.bfloat16) for w in widths}  # (M, w)
    for variant, gram in GRAMS.items():
        try:
            gram(inputs[widths[0]][:8])
        except RuntimeError as e:  # e.g. torch.mm's out_dtype on a CPU
            out["grams_ms"][variant] = f"unsupported here: {str(e).splitlines()[0][:120]}"
            continue
        out["grams_ms"][variant] = {  # all calls of that width in one capture
            str(w): round(median_ms(lambda w=w: gram(inputs[w]), args.repeats, device=dev) * counts[w], 3)
            for w in widths}
        with mock.patch.object(M, "gram_matrix", gram):  # accumulate_gram's bf16/fp16 rows
            out["ms"][f"capture_gram_{variant}"] = median_ms(calls["capture"], args.repeats, device=dev)
    out["profile_capture"] = top_kernels(calls["capture"])
    out["profile_forward"] = top_kernels(calls["forward"])
    if args.compiled:
        fn = torch.compile(lambda: model(x, y, hessians=hess), fullgraph=True, dynamic=False)
        out["capture_compiled_first_seconds"] = round(timed(run(fn), sync_device=dev)[1], 1)
        out["ms"]["capture_compiled"] = median_ms(run(fn), args.repeats, device=dev)
    return out


def _gram_calls(model) -> dict[int, int]:
    """Input width -> accumulate_gram calls per capture (q/k/v share one call per layer)."""
    calls: dict[int, int] = {}
    for name, width in model.hessian_shapes().items():
        if not name.endswith(("attn.c_k.weight", "attn.c_v.weight")):
            calls[width] = calls.get(width, 0) + 1
    return calls


def main(argv: list[str] | None = None) -> None:
    from bench.bench_compile import parse_batch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    overrides.add_profile_argument(ap, "its model is built, with its train section's CUDA kernels")
    ap.add_argument("--batch", default="48x2048", help="BxT of the captured micro-batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="also time a compiled capture forward")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.batch = parse_batch(args.batch)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    source, _ = overrides.resolve(args.profile)  # a bad profile stops here
    measured, seconds = timed(measure, args)
    result = {"profile": source, "batch": list(args.batch), "versions": versions(), **measured,
              "seconds": round(seconds, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ms"]), json.dumps(result["grams_ms"]))


if __name__ == "__main__":
    main()
