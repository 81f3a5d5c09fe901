"""Ablations through the real pipeline: one `dvc repro` per row and seed, one JSON for the table.

    python -m bench.ablate --rows bench/ablation_model.yaml --out results.json [--only a,b] [--budget 560]
        [--common train.grad_accum_steps=2 ...] [--seeds 1337,42] [--baseline ROW] [--quick]
    python -m bench.ablate --merge seed1337.json seed42.json --out results.json [--baseline ROW]  # separate calls

The protocol (README "Seeds and significance"): a row is "better" than the baseline row (the first
one unless `--baseline`) only from at least 2 seeds and at least 180 s of training per run, the
arms paired (every seed runs every row, back to back on this machine), and `pgolf.seeds`' test
passed (`seeds.paired`: the one-sided t test of the gain in nats per token). By default the runner
refuses a plan that cannot meet it (one seed, or a row whose train.max_wallclock_seconds is below
`--min-train-seconds`); `--quick` runs such a plan anyway and marks the result `claims: false`.
The JSON's `comparisons` hold each row's paired test against the baseline and its verdict, and
the baseline's against the row (`reverse`: for a row that turns a part off, whether the part helps).

A rows file names a base profile (`profiles/<base>.yaml`: only its differences from the record
defaults, resolved to every key), `common` overrides for every row (`section.key: value`, e.g. the
data folder, one GPU, the wallclock) and the rows, each with its own overrides (and optionally its
own `profile`, and `score`: which score of its evaluation the tests compare, SCORES: `final`, or
`pre_ttt` / `untilted`, the same evaluation before TTT or without the n-gram tilt, so a row with no
overrides measures what TTT or the tilt gives without a run of its own); `--common
section.key=value` (YAML values) adds to or replaces the file's `common` for one call, and the
JSON's `common` is what ran. Every row's params are checked (keys and
values, as the params stage checks them) before the first run. For each row the runner writes
the complete params.yaml, runs `dvc repro` and records which stages DVC ran and which it took from
its cache: a row that changes only quantize/compress/evaluate params reuses the trained weights,
and the row shows it (`ran` lacks train; `train_md5`, the hash of artifacts/train in dvc.lock, is
the same). Per row: steps, float val_bpb, artifact val_bpb (sliding, and non-sliding), bytes,
stage seconds.

The JSON is rewritten after every row, so a run cut short keeps the rows before; `--budget`
(seconds) skips the rows that would not finish in time, estimated from the slowest row so far
that ran the same stages (a row whose params and seed a finished run of the call had is never
skipped: DVC takes it from its cache); `--keep-quant DIR` copies the baseline row's quantized
model (artifacts/quant/quant.pgt) of each seed to DIR, for codec measurements off the GPU;
`--resume` continues such a run from its JSON: rows that finished (rc 0) are kept and not rerun,
and the environment of each call is listed; `--merge` joins the results of calls that ran
different seeds. Each run records `params_md5`, the hash of its complete
params but the seed, and both refuse to pair runs of one row whose hashes differ. Each row records its
GPU model: a run resumed on another (an H200 after an H100) makes no claim, since a wallclock-bound
row trains a different number of steps on each. Rerun in the same
checkout (DVC's cache still holds the trained weights), a resumed post-training row shows that
train did not run again. Needs dvc on the PATH of `python -m dvc` and, for the GPU rows, CUDA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import overrides
from bench.bench_eval import versions
from bench.bench_vs_ref import read_alike
from pgolf import config

REPO = Path(__file__).resolve().parents[1]
RAN = re.compile(r"Running stage '([^']+)'")
KEEP = {  # metrics file -> keys copied into a row
    "train": ("steps", "train_seconds", "step_avg_ms", "tokens_per_second", "val_bpb_float", "model_params",
              "stopped_by", "qat_start_step", "loop_start_step", "peak_memory_mb", "warmup_seconds"),
    "quant": ("quantize_seconds", "gptq_rtn_error_ratio", "lqer_tensors", "lqer_bytes_raw", "qat_bits",
              "qat_bits_match"),
    "size": ("codec", "model_bytes", "code_bytes", "total_bytes", "lzma_bytes", "zstd_bytes", "brotli_bytes",
             "under_cap", "compress_seconds", "pruned_values", "prune_compressions", "prune_seconds"),
    "eval": ("val_bpb", "val_loss", "scored_tokens", "scored_bytes", "val_bpb_nonsliding", "val_bpb_sliding",
             "eval_seconds", "sliding_seconds", "nonsliding_seconds", "ttt_seconds", "ttt_enabled",
             "val_loss_pre_ttt", "val_bpb_pre_ttt", "val_loss_untilted", "val_bpb_untilted"),
}
# a row's `score`: which of its evaluation's scores the tests compare ((loss, bpb) keys of eval.json), and
# the param that must be on for the evaluation to report it
SCORES = {"final": ("val_loss", "val_bpb", None),
          "pre_ttt": ("val_loss_pre_ttt", "val_bpb_pre_ttt", "ttt_enabled"),  # the same run before TTT
          "untilted": ("val_loss_untilted", "val_bpb_untilted", "ngram_tilt")}  # the same pass without the tilt


class RowsError(ValueError):
    pass


def load_rows(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    for key in ("base", "rows"):
        if key not in spec:
            raise RowsError(f"{path}: no {key!r}")
    names = [r.get("name") for r in spec["rows"]]
    if None in names or len(set(names)) != len(names):
        raise RowsError(f"{path}: every row needs a unique name, got {names}")
    for r in spec["rows"]:
        if score_of(r) not in SCORES:
            raise RowsError(f"{path}: row {r['name']!r} has score {r['score']!r}; one of {', '.join(SCORES)}")
    return spec


def score_of(row: dict) -> str:
    """The row's `score` (SCORES): "final" unless the rows file names another."""
    return row.get("score", "final")


def params_for(spec: dict, row: dict) -> dict:
    """The complete params of a row: profiles/<profile>.yaml resolved (record defaults + its
    differences), the common, then the row's, `section.key` overrides applied, every value checked
    as the params gate will check it (a bad row stops the call before any run)."""
    profile = row.get("profile", spec["base"])
    try:
        source, params = overrides.resolve(profile, REPO)
        for where, sets in (("common", spec.get("common") or {}), (row["name"], row.get("set") or {})):
            overrides.apply(params, sets, where, source)
        config.load_all(params, f"{row['name']}: {source} with the overrides")
    except ValueError as e:  # ConfigError too
        raise RowsError(str(e)) from None
    needs = SCORES[score_of(row)][2]
    if needs and not params["evaluate"][needs]:
        raise RowsError(f"{row['name']}: score {score_of(row)!r} needs evaluate.{needs}: true, and its params "
                        f"have it off (the evaluation would not report that score)")
    return params


def with_common(spec: dict, items: list[str]) -> dict:
    """The rows spec with `section.key=value` items (YAML values) added to its `common`."""
    try:
        sets = overrides.parse(items, "--common")
    except ValueError as e:
        raise RowsError(str(e)) from None
    return {**spec, "common": {**(spec.get("common") or {}), **sets}}


def read_metrics(root: Path) -> dict:
    out = {}
    for name, keys in KEEP.items():
        p = root / "metrics" / f"{name}.json"
        m = json.loads(p.read_text()) if p.exists() else {}
        out.update({f"{name}.{k}": m[k] for k in keys if k in m})
    return out


def train_md5(root: Path) -> str | None:
    lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").exists() else {}
    for out in lock.get("stages", {}).get("train", {}).get("outs", []):
        if out.get("path") == "artifacts/train":
            return out.get("md5")
    return None


def params_md5(params: dict) -> str:
    """The hash of a row's complete params but its seed: equal for every seed of one row, different
    once a profile or an override changes (`merge` refuses to pair such runs)."""
    rest = {**params, "train": {k: v for k, v in params["train"].items() if k != "seed"}}
    return hashlib.md5(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def run_row(spec: dict, row: dict, seed: int, log_dir: Path) -> dict:
    params = params_for(spec, row)
    digest = params_md5(params)
    params["train"]["seed"] = seed
    (REPO / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    lines = []
    with open(log_dir / f"{row['name']}_seed{seed}.log", "w") as log:  # streamed, each line with its second
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            lines.append(line.rstrip())
            log.write(f"{time.perf_counter() - t0:7.1f} {line}")
            log.flush()
        proc.wait()
    seconds, out = round(time.perf_counter() - t0, 1), "\n".join(lines)
    rec = {"name": row["name"], "seed": seed, "profile": row.get("profile", spec["base"]),
           "set": row.get("set") or {}, "score": score_of(row), "params_md5": digest, "ran": RAN.findall(out),
           "seconds": seconds, "rc": proc.returncode}
    if proc.returncode != 0:  # the metrics files may be an earlier row's: keep none
        return rec | {"error_tail": lines[-15:]}
    return rec | read_metrics(REPO) | {"train_md5": train_md5(REPO)}


def too_slow(rec_so_far: list[dict], trains: bool, left: float) -> bool:
    """True when the slowest finished row of the same kind (trains or not) would not fit in `left`."""
    same = [r["seconds"] for r in rec_so_far if "seconds" in r and ("train" in r["ran"]) == trains]
    return bool(same) and max(same) > left


def ran_before(done: list[dict], spec: dict, row: dict, seed: int) -> bool:
    """Whether a finished run of this call had the row's params and seed: DVC then takes every stage from
    its cache (a row that only compares another score), so the budget need not fit a run."""
    digest = params_md5(params_for(spec, row))
    return any(r.get("rc") == 0 and r.get("seed") == seed and r.get("params_md5") == digest for r in done)


def keep_quant(folder: Path, name: str, seed: int) -> Path:
    """The workspace's artifacts/quant/quant.pgt (the run just finished) copied to folder/NAME_seedSEED.quant.pgt."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{name}_seed{seed}.quant.pgt"
    shutil.copyfile(REPO / "artifacts" / "quant" / "quant.pgt", dst)
    return dst


def trains(spec: dict, job: tuple[dict, int], prev: tuple[dict, int] | None) -> bool:
    """Whether a (row, seed) changes model/train/prepare params relative to the previous one."""
    if prev is None or job[1] != prev[1]:
        return True
    a, b = params_for(spec, job[0]), params_for(spec, prev[0])
    return any(a[s] != b[s] for s in ("prepare", "model", "train"))


def check_protocol(spec: dict, rows: list[dict], seeds: list[int], min_seconds: float) -> None:
    """RowsError unless the plan can show a row better: >= 2 distinct seeds and every row's
    train.max_wallclock_seconds >= min_seconds (0, step-based, is checked on the runs instead)."""
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
        raise RowsError(f"--seeds {seeds}: the protocol needs at least 2 distinct seeds (--quick to run anyway, "
                        f"without claims)")
    for row in rows:
        wall = params_for(spec, row)["train"]["max_wallclock_seconds"]
        if 0 < wall < min_seconds:
            raise RowsError(f"{row['name']}: train.max_wallclock_seconds {wall} is below the protocol's "
                            f"{min_seconds} s per arm (--quick to run anyway, without claims)")


def _scored(rec: dict) -> bool:
    """Whether a finished run holds the score its row compares."""
    return rec.get("rc") == 0 and f"eval.{SCORES[score_of(rec)][0]}" in rec


def _as_run(rec: dict):
    from pgolf.submit import seeds

    loss, bpb, _ = SCORES[score_of(rec)]
    return seeds.Run(f"{rec['name']}_seed{rec['seed']}", "", {"train.seed": rec["seed"]}, rec[f"eval.{loss}"],
                     rec[f"eval.{bpb}"], rec["eval.scored_bytes"] / rec["eval.scored_tokens"])


def compare(result: dict, baseline: str, min_seconds: float, claims: bool) -> dict:
    """Each row's paired test against `baseline` (seeds.paired) and its verdict, and under `reverse`
    the baseline's test against the row (for a row that turns one part off: whether the part helps).
    A verdict is "better" only when claims are on, every run of both arms trained >= min_seconds on
    one GPU model (a resumed run may have moved machines; a row without `gpu` ran on the result's
    first environment) and the test passed."""
    done = [r for r in result["rows"] if _scored(r)]
    base = [r for r in done if r["name"] == baseline]
    out = {}
    for name in dict.fromkeys(r["name"] for r in done if r["name"] != baseline):
        arm = [r for r in done if r["name"] == name]
        out[name] = _paired(result, base, arm, min_seconds, claims)
        if "why" not in out[name]:
            out[name]["reverse"] = _paired(result, arm, base, min_seconds, claims)
    return out


def _paired(result: dict, base: list[dict], arm: list[dict], min_seconds: float, claims: bool) -> dict:
    from pgolf.submit import seeds

    try:
        test = seeds.paired([_as_run(r) for r in base], [_as_run(r) for r in arm])
    except seeds.SeedsError as e:
        return {"verdict": "no test", "why": str(e)}
    long_enough = all(r.get("train.train_seconds", 0) >= min_seconds for r in base + arm)
    gpus = sorted({str(r.get("gpu", result["environment"].get("gpu"))) for r in base + arm})
    verdict = ("better" if test["significant"] else "not shown better") if claims and long_enough else "no claim"
    return {**test, "trained_long_enough": long_enough, "gpus": gpus,
            "verdict": verdict if len(gpus) == 1 else "no claim"}


def resumed(old: dict, path: Path, env: dict) -> dict:
    """An earlier run's result with only its finished rows, and this call's environment added."""
    if not isinstance(old.get("rows"), list):
        raise RowsError(f"{path}: not an ablation result (no 'rows' list) to resume")
    old["rows"] = [r for r in old["rows"] if r.get("rc") == 0]
    old.setdefault("resumed", []).append(env)
    return old


def check_resumed_params(done: list[dict], spec: dict, rows: list[dict], path: Path) -> None:
    """RowsError if a finished row of `path` ran with other params than the rows file gives it now
    (a profile or override changed since): its seeds and the new ones could not be paired."""
    now = {row["name"]: (params_md5(params_for(spec, row)), score_of(row)) for row in rows}
    for r in done:
        if r["name"] in now and (r.get("params_md5", now[r["name"]][0]), score_of(r)) != now[r["name"]]:
            raise RowsError(f"{path}: row {r['name']!r} seed {r['seed']} ran with other params or score than the "
                            f"rows file gives it now (a profile, override or score changed); start a new --out")


MERGE_SAME = ("rows_file", "base", "common", "min_train_seconds")


def merge(paths: list[Path], baseline: str = "") -> dict:
    """One result from the JSONs of several calls that each ran some seeds of one rows file (a lent
    machine's session holds one seed's trained model in its DVC cache): the first one's head, every
    call's finished rows (each with its GPU model, from its call's environment where it predates
    `gpu`), the comparisons against `baseline` (default: the first file's) over all of them. Claims
    are on when the rows hold at least 2 seeds; `compare` still asks every run's training time and
    one GPU model. RowsError unless the calls ran the same rows file, base, common and protocol, if a
    row and seed finished in two, if a row's params differ between files (`params_md5`; rows from
    before it was recorded are not checked), or if no row is the baseline."""
    try:
        docs = read_alike(paths, MERGE_SAME)
    except ValueError as e:
        raise RowsError(str(e)) from None
    rows = [{**r, "gpu": r.get("gpu", d["environment"].get("gpu"))}
            for d in docs for r in d["rows"] if r.get("rc") == 0]
    done = [(r["name"], r["seed"]) for r in rows]
    twice = sorted({k for k in done if done.count(k) > 1})
    if twice:
        raise RowsError(f"--merge: row {twice[0][0]!r} seed {twice[0][1]} finished in two files")
    for name in dict.fromkeys(n for n, _ in done):
        if len({r["params_md5"] for r in rows if r["name"] == name and "params_md5" in r}) > 1:
            raise RowsError(f"--merge: row {name!r} ran with different params in the files (a profile or "
                            f"override changed between them), so its seeds cannot be paired")
        if len({score_of(r) for r in rows if r["name"] == name}) > 1:
            raise RowsError(f"--merge: row {name!r} compares different scores in the files, so its seeds "
                            f"cannot be paired")
    baseline = baseline or docs[0]["baseline"]
    if baseline not in {r["name"] for r in rows}:
        names = ", ".join(dict.fromkeys(n for n, _ in done))
        raise RowsError(f"--baseline {baseline!r} is not one of the merged rows ({names})")
    head = {k: v for k, v in docs[0].items() if k not in ("rows", "comparisons", "seeds", "claims", "resumed")}
    seeds = sorted({r["seed"] for r in rows})
    result = {**head, "baseline": baseline, "seeds": seeds, "claims": len(seeds) >= 2,
              "merged_from": [p.name for p in paths], "environments": [d["environment"] for d in docs], "rows": rows}
    result["comparisons"] = compare(result, result["baseline"], result["min_train_seconds"], result["claims"])
    return result


def shard_info(spec: dict, rows: list[dict]) -> dict:
    """{prepare.corpus: its proxy_shards.json} for each shard folder the rows train on that has one
    (bench.proxy_shards writes it: the corpus, the documents and tokens it holds)."""
    info = {}
    for row in rows:
        corpus = params_for(spec, row)["prepare"]["corpus"]
        path = REPO / corpus / "proxy_shards.json"
        if corpus not in info and path.is_file():
            info[corpus] = json.loads(path.read_text())
    return info


def jobs(rows: list[dict], seeds: list[int]) -> list[tuple[dict, int]]:
    """(row, seed) in run order: every row for the first seed, then every row for the next (the
    arms of one seed run back to back, so a slow spell of the machine hits them alike)."""
    return [(row, seed) for seed in seeds for row in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--merge":
        ap.add_argument("--merge", type=Path, nargs="+", required=True)
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--baseline", default="", help="the row the others are tested against "
                        "(default: the first file's)")
        a = ap.parse_args(argv)
        a.out.write_text(json.dumps(merge(a.merge, a.baseline), indent=1) + "\n")
        return 0
    ap.add_argument("--rows", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated row names (default: all, in file order)")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds; skip runs that would not finish")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/ablate_logs"), help="each run's dvc output")
    ap.add_argument("--resume", action="store_true", help="keep the finished runs of --out and run the rest")
    ap.add_argument("--common", nargs="*", default=[], help="section.key=value overrides for every row, after the file's")
    ap.add_argument("--seeds", default="1337,42", help="comma-separated train.seed values, each run for every row")
    ap.add_argument("--baseline", default="", help="the row the others are tested against (default: the first)")
    ap.add_argument("--min-train-seconds", type=float, default=180.0, help="training per run the protocol needs")
    ap.add_argument("--quick", action="store_true", help="run a plan below the protocol; the result makes no claims")
    ap.add_argument("--keep-quant", type=Path, default=None,
                    help="copy the baseline row's artifacts/quant/quant.pgt of each seed into this folder")
    a = ap.parse_args(argv)
    spec = with_common(load_rows(a.rows), a.common)
    rows = [r for r in spec["rows"] if not a.only or r["name"] in a.only.split(",")]
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        raise RowsError(f"--seeds {a.seeds!r}: want comma-separated integers") from None
    baseline = a.baseline or rows[0]["name"]
    if baseline not in [r["name"] for r in rows]:
        raise RowsError(f"--baseline {baseline!r} is not one of the rows run ({', '.join(r['name'] for r in rows)})")
    for r in rows:
        params_for(spec, r)  # every override names a real key, before any run
    if not a.quick:
        check_protocol(spec, rows, seeds, a.min_train_seconds)
    log_dir = a.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**versions(), "host": platform.node()}
    result = {"rows_file": str(a.rows), "title": spec.get("title", ""), "base": spec["base"],
              "common": spec.get("common") or {}, "environment": env, "seeds": seeds, "baseline": baseline,
              "min_train_seconds": a.min_train_seconds, "claims": not a.quick, "rows": []}
    if a.resume and a.out.exists():
        result = resumed(json.loads(a.out.read_text()), a.out, env)
        check_resumed_params(result["rows"], spec, rows, a.out)
    result["data"] = shard_info(spec, rows)
    done = {(r["name"], r.get("seed")) for r in result["rows"]}
    t0, prev = time.perf_counter(), None
    for row, seed in jobs(rows, seeds):
        if (row["name"], seed) in done:
            continue
        left = a.budget - (time.perf_counter() - t0) if a.budget > 0 else float("inf")
        cached = ran_before(result["rows"], spec, row, seed)
        if not cached and too_slow(result["rows"], trains(spec, (row, seed), prev), left):
            result["rows"].append({"name": row["name"], "seed": seed, "skipped": f"budget: {left:.0f} s left"})
        else:
            rec = run_row(spec, row, seed, log_dir) | {"gpu": env["gpu"]}
            result["rows"].append(rec)
            prev = (row, seed)
            if a.keep_quant and row["name"] == baseline and rec["rc"] == 0:
                keep_quant(a.keep_quant, row["name"], seed)
            print(json.dumps({k: rec.get(k) for k in ("name", "seed", "ran", "seconds", "rc", "train.steps",
                                                       "train.val_bpb_float", "eval.val_bpb", "size.total_bytes")}),
                  flush=True)
        result["comparisons"] = compare(result, baseline, result["min_train_seconds"], result["claims"])
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
