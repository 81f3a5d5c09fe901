"""Side-by-side training throughput: an anchor's record script and pgolf, one GPU, one run.

    python -m bench.bench_vs_ref --data DIR --out bench/results/vs_ref_h200.json \\
        [--anchor pr1072|pr535|pr2135] [--stub-dir DIR] [--ref SCRIPT] [--trace-dir DIR] [--profile-reference]
    python -m bench.bench_vs_ref --merge a.json b.json --out x.json [--note TEXT]   # halves run in two calls

`--anchor` (bench.anchors; PR #1072 by default) picks the script, its logged runs' settings, its
log format, the tokenizer of the shards and the pgolf profile trained beside it; PR #535 and PR
#2135 need a FlashAttention-3 stand-in (`--stub-dir`). What follows describes the PR #1072 pair.

Both programs train the record model (11L, d 512) on the same challenge-format shards in `DIR`
(`fineweb_train_*.bin`, `fineweb_val_*.bin`; the sp1024 tokenizer is pgolf's vendored copy),
at 786,432 and 196,608 tokens per step (the script: 8 micro-batches of 48 or 12 x 2048; pgolf:
its profile's train.grad_accum_steps, auto = 8 of 48 or 2 of 48, and `--also "196608
train.grad_accum_steps=8"` adds the script's own split), lr scale 1 (no
warmdown, so neither switches late QAT on), 3 compile-priming steps, logging every 5 steps,
40 steps at 786,432 tokens and 100 otherwise unless `--steps` says.
Each run is its own process, one after the other on the same GPU (the reference as a
subprocess of its unmodified script, pgolf through bench.profile_train on its real training
loop). Steady state for both: the median over logged intervals from step 10 on of
(train clock at the end - at the start) / steps, so stalls (compiles, Hessian passes) are
excluded and listed separately. Runs, in order of importance: pgolf 786k (cold compile cache,
profiled), reference 786k, pgolf 196k (profiled), reference 196k, then pgolf 786k again with a
warm compile cache. The JSON is rewritten after every run, so a run cut by `--budget` keeps the
ones before it. Every path is resolved first: the reference runs in a scratch folder. pgolf's runs
end with a few steps under torch.profiler; `--profile-reference` does the same for the script,
unmodified, through bench.ref_profile, so both step profiles come from one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import anchors, overrides

REPO = Path(__file__).resolve().parents[1]
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "PYTHONUNBUFFERED": "1"}
STEPS = {786432: 40, 196608: 100}  # other batch sizes (smoke runs): 100 steps
LOG_EVERY = 5
FIRST_STEADY = 10
FIRST_STEP = re.compile(r"^step:1/\d+ ")
PROFILED = 3  # --profile-reference: the script's steps under torch.profiler, after its timed ones


def ref_steady(marks: list[tuple[int, float]]) -> tuple[float, list[float]]:
    """Median ms/step over the reference's logged intervals from step FIRST_STEADY on; an interval
    more than 1.5x the median is a stall and is dropped (its own log has no step kinds)."""
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks, marks[1:]) if s0 >= FIRST_STEADY]
    if not rates:
        return float("nan"), []
    med = statistics.median(rates)
    return statistics.median([r for r in rates if r <= 1.5 * med]), [round(r, 2) for r in rates]


def steps_for(batch: int, steps: int = 0) -> int:
    """`steps` (--steps) when given, else STEPS' count for this batch size."""
    return steps or STEPS.get(batch, 100)


def stream(cmd: list[str], cwd, env: dict, timeout: float, on_line=None) -> tuple[list[str], float | None]:
    """Run `cmd`, reading its output line by line until it ends, `on_line(line)` returns True or
    `timeout` seconds pass; then kill it. -> (lines, seconds from start to its first step line)."""
    t0, first, lines = time.perf_counter(), None, []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if first is None and FIRST_STEP.match(line):
                first = time.perf_counter() - t0
            if (on_line is not None and on_line(line)) or time.perf_counter() - t0 > timeout:
                break
    finally:
        proc.kill()
        proc.wait()
    return lines, first


def run_ref(script: Path, data: Path, batch: int, timeout: float, steps: int,
            anchor: anchors.Anchor = anchors.ANCHORS["pr1072"], stub_dir: Path | None = None,
            profile: Path | None = None) -> dict:
    """The unmodified record script on one GPU for `steps` steps at lr scale 1 (no warmdown);
    stopped once the last is logged. With `profile` (a JSON path), PROFILED more steps then run under
    torch.profiler (bench.ref_profile) and their summary is the result's "profile"."""
    iterations = steps + (PROFILED if profile else 0)
    env = {**os.environ, **SAFE_ENV, **anchor.env, "DATA_PATH": str(data), "TOKENIZER_PATH": str(anchor.tokenizer),
           "TRAIN_BATCH_TOKENS": str(batch), "ITERATIONS": str(iterations), "WARMDOWN_ITERS": "0", "WARMDOWN_FRAC": "0",
           "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_LOG_EVERY": str(LOG_EVERY), "VAL_LOSS_EVERY": "0",
           "WARMUP_STEPS": "3", "SEED": "1337", "RUN_ID": f"bench{batch}"}
    env = anchors.with_stub(env, stub_dir)
    cmd = [sys.executable, str(script)]
    if profile:  # the wrapper is imported from this checkout: the script runs in a scratch folder
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p)
        cmd = [sys.executable, "-m", "bench.ref_profile", str(script), "--at", str(steps), "--steps", str(PROFILED),
               "--accum", "8", "--out", str(profile)]  # the scripts: 8 micro-batches a step on one GPU
    marks, losses, t0, seen, timed = [], [], time.perf_counter(), {}, []

    def on_line(line: str) -> bool:
        got = anchor.parse_step(line, batch)
        if not got and not line.startswith("  "):  # its settings dump is indented; the rest is timed
            timed.append([round(time.perf_counter() - t0, 1), line.rstrip()[:160]])
        if got and got[0] <= steps:  # the profiled steps after them are not timed
            seen.setdefault("first", time.perf_counter() - t0)
            marks.append((got[0], got[2]))
            losses.append([got[0], got[1]])
        return bool(got) and got[0] >= steps and not profile  # the wrapper ends itself after its window

    with tempfile.TemporaryDirectory() as cwd:
        lines, first = stream(cmd, cwd, env, timeout, on_line)
    first = first or seen.get("first")
    med, rates = ref_steady(marks)
    extra = {"profile": json.loads(profile.read_text())["profile"]} if profile and profile.is_file() else {}
    return {**extra, "program": "reference", "batch_tokens": batch, "step_ms_steady": round(med, 2),
            "interval_ms_per_step": rates, "tokens_per_second": round(batch / med * 1000.0) if rates else None,
            "seconds_to_first_step": round(first, 1) if first else None, "steps_logged": len(marks),
            "loss_curve": losses, "timeline": timed[-60:], "log_tail": lines[-40:] if not rates else []}


def run_pgolf(batch: int, timeout: float, data: Path, out: Path, extra: list[str], trace_dir: str | None,
              steps: int, profile_args: tuple[str, ...] = ()) -> dict:
    """bench.profile_train in its own process (`profile_args`: the anchor's profile and tokenizer);
    the time to its first logged step measured here."""
    cmd = [sys.executable, "-m", "bench.profile_train", "--batch-tokens", str(batch), "--steps", str(steps),
           "--log-every", str(LOG_EVERY), "--data", str(data), "--out", str(out), *profile_args, *extra]
    if trace_dir:
        cmd += ["--trace-dir", trace_dir]
    lines, first = stream(cmd, REPO, {**os.environ, **SAFE_ENV}, timeout)
    if not out.is_file():
        return {"program": "pgolf", "batch_tokens": batch, "error": "no result", "log_tail": lines[-8:]}
    res = json.loads(out.read_text())["results"][0]
    res.update(program="pgolf", variant=" ".join(extra) or "default",
               seconds_to_first_step_outside=round(first, 1) if first else None)
    return res


def device_info() -> dict:
    import torch
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__}


def add_mfu(r: dict, fpt: float) -> None:
    """MFU as bench_train counts it (same model, same FLOPs per token for both programs)."""
    from bench.bench_train import PEAK_BF16

    if r.get("tokens_per_second"):
        r["mfu"] = round(fpt * r["tokens_per_second"] / PEAK_BF16, 4)


def record_flops_per_token(profile: str = "record") -> float:
    import torch

    from bench.bench_train import flops_per_token
    from bench.profile_train import record_configs
    from pgolf.shared.model import GPT

    mcfg, tcfg = record_configs([], profile)
    with torch.device("meta"):
        return flops_per_token(GPT(mcfg), mcfg, tcfg.seq_len)


def ratios(results: list[dict], batches: list[int]) -> dict:
    """Each pgolf variant's tokens/s over the reference's, per batch size."""
    out = {}
    for batch in batches:
        ref = [r for r in results if r["program"] == "reference" and r["batch_tokens"] == batch and r.get("tokens_per_second")]
        pg = [r for r in results if r["program"] == "pgolf" and r["batch_tokens"] == batch and r.get("tokens_per_second")]
        if ref:
            out[str(batch)] = {v["variant"]: round(v["tokens_per_second"] / ref[0]["tokens_per_second"], 3) for v in pg}
    return out


def also_runs(also: list[str], batches: list[int]) -> dict[int, list[list[str]]]:
    """`--also` entries ("BATCH section.key=value ...") -> {batch: [profile_train args, ...]}:
    extra pgolf variants (e.g. fewer, larger micro-batches) run right after that batch's pair."""
    out: dict[int, list[list[str]]] = {}
    for entry in also:
        head, *sets = entry.split()
        if not head.isdigit() or int(head) not in batches or not sets:
            raise ValueError(f"--also {entry!r}: want 'BATCH section.key=value ...' with BATCH one of {batches}")
        overrides.parse(sets, "--also")  # each one is section.key=value, checked before any run
        out.setdefault(int(head), []).append(["--set", *sets, "--profile-steps", "0"])
    return out


def plan(args) -> list[tuple]:
    """pgolf then the reference at each batch size in the order given (then that batch's `--also`
    variants), then pgolf again at the first one with a warm compile cache; `--programs` keeps only
    (and orders) the programs it names."""
    x, extra = args.pgolf_extra, also_runs(args.also, args.batches)
    runs = [run for batch in args.batches
            for run in [("pgolf", batch, x), ("reference", batch, None), *[("pgolf", batch, x + v) for v in extra.get(batch, [])]]]
    runs += [("pgolf", args.batches[0], x + ["--profile-steps", "0"])][:args.variants]
    runs = [r for r in runs if r[0] in args.programs]
    if args.programs[0] == "reference":  # stable: only the reference moves ahead within its batch
        runs.sort(key=lambda r: (args.batches.index(r[1]), r[0] != "reference"))
    return runs


MERGE_SAME = ("what", "device", "torch", "triton", "data", "steps", "reference_stub")


def read_alike(paths: list[Path], keys: tuple[str, ...]) -> list[dict]:
    """The JSON documents of `paths` (one bench's results from several calls, to be merged);
    ValueError naming the first of `keys` whose value differs between them."""
    docs = [json.loads(p.read_text()) for p in paths]
    for key in keys:
        values = {json.dumps(d.get(key)) for d in docs}
        if len(values) > 1:
            raise ValueError(f"--merge: the files differ in {key!r}: {', '.join(sorted(values))}")
    return docs


def merge(paths: list[Path], note: str | None = None) -> dict:
    """One result from the JSONs of calls that each ran some of the programs (`--programs`) on one
    warm machine: the first one's head, every call's runs, the ratios over all. ValueError unless
    the calls ran the same anchor, GPU model, versions, shards and steps."""
    docs = read_alike(paths, MERGE_SAME)
    results = [r for d in docs for r in d["results"]]
    batches = sorted({r["batch_tokens"] for r in results}, reverse=True)
    head = {k: v for k, v in docs[0].items() if k not in ("results", "ratio_tokens_per_second")}
    return {**head, **({"note": note} if note else {}), "merged_from": [p.name for p in paths],
            "ratio_tokens_per_second": ratios(results, batches), "results": results}


def merge_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="merge the JSONs of calls that ran the halves of one pair")
    ap.add_argument("--merge", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default=None, help="where and how the calls ran (the GPU's UUID, the call order)")
    a = ap.parse_args(argv)
    try:
        a.out.write_text(json.dumps(merge(a.merge, a.note), indent=1) + "\n")
    except ValueError as e:
        ap.error(str(e))


def main() -> None:
    if sys.argv[1:2] == ["--merge"]:
        return merge_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder of fineweb_train_*.bin / fineweb_val_*.bin shards")
    ap.add_argument("--anchor", default="pr1072", help=f"the script run beside pgolf: {', '.join(anchors.ANCHORS)}")
    ap.add_argument("--ref", default=None, help="its train_gpt.py (default: the anchor's in ../shared/anchors)")
    ap.add_argument("--stub-dir", default=None, help="folder with a flash_attn_interface stand-in (PR #535, #2135)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--budget", type=float, default=560.0, help="seconds for all runs; later runs are skipped")
    ap.add_argument("--variants", type=int, default=1, help="1: end with a warm-compile-cache pgolf run")
    ap.add_argument("--batches", type=int, nargs="+", default=[786432, 196608],
                    help="tokens per step, in order (one value: a shorter call)")
    ap.add_argument("--programs", nargs="+", choices=("pgolf", "reference"), default=["pgolf", "reference"],
                    help="which programs run, in this order at each batch size (one: a call on a warm machine "
                         "whose other half ran in the call before)")
    ap.add_argument("--pgolf-extra", nargs="*", default=[], help="more bench.profile_train arguments")
    ap.add_argument("--steps", type=int, default=0,
                    help="training steps of every run (0: 40 at 786,432 tokens, else 100)")
    ap.add_argument("--profile-reference", action="store_true",
                    help=f"after its timed steps, {PROFILED} more of the script's under torch.profiler "
                         "(bench.ref_profile): its top kernels beside pgolf's")
    ap.add_argument("--also", action="append", default=[],
                    help="an extra pgolf variant after a batch's pair: 'BATCH section.key=value ...' (repeatable)")
    args = ap.parse_args()
    try:
        runs = plan(args)
    except ValueError as e:
        ap.error(str(e))
    if args.steps < 0:
        ap.error(f"--steps must be >= 0, got {args.steps}")
    try:
        anchor = anchors.get(args.anchor)
    except ValueError as e:
        ap.error(str(e))
    args.ref = args.ref or str(anchor.script)
    profile_args = ["--profile", anchor.profile, "--tokenizer", str(anchor.tokenizer)]
    stub = Path(args.stub_dir).resolve() if args.stub_dir else None
    args.data, args.ref = str(Path(args.data).resolve()), str(Path(args.ref).resolve())  # both run elsewhere
    for path in (Path(args.data), Path(args.ref)):
        if not path.exists():
            ap.error(f"{path} does not exist")
    steps = {b: steps_for(b, args.steps) for b in args.batches}
    t_all = time.perf_counter()
    head = {"what": f"training step throughput, the {anchor.name} script vs pgolf's {anchor.profile} profile, same GPU, "
                    f"same shards, one run", "reference_stub": str(stub) if stub else None,
            **device_info(), "data": str(args.data), "steps": steps,
            "log_every": LOG_EVERY,
            "steady_state": f"median over logged intervals from step {FIRST_STEADY}, stalls excluded"}
    results = []
    fpt = record_flops_per_token(anchor.profile)
    scratch = Path(tempfile.mkdtemp())
    for i, (prog, batch, extra) in enumerate(runs):
        left = args.budget - (time.perf_counter() - t_all)
        if left < 30:
            results.append({"program": prog, "batch_tokens": batch, "variant": " ".join(extra or []), "skipped": "budget"})
            continue
        t0 = time.perf_counter()
        if prog == "reference":
            r = run_ref(Path(args.ref), Path(args.data), batch, left, steps[batch], anchor, stub,
                        scratch / f"ref_profile{i}.json" if args.profile_reference else None)
        else:
            trace = args.trace_dir if ("--profile-steps" not in extra and args.trace_dir) else None
            r = run_pgolf(batch, left, Path(args.data), scratch / f"run{i}.json", extra, trace, steps[batch],
                          tuple(profile_args))
        r["run_seconds"] = round(time.perf_counter() - t0, 1)
        add_mfu(r, fpt)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k in ("program", "batch_tokens", "variant", "step_ms_steady",
                                                               "tokens_per_second", "seconds_to_first_step",
                                                               "seconds_to_first_step_outside", "warmup_seconds",
                                                               "run_seconds", "error", "log_tail", "stalls")}), flush=True)
        summary = {**head, "ratio_tokens_per_second": ratios(results, args.batches), "results": results}
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(ratios(results, args.batches)))


if __name__ == "__main__":
    main()
