"""An anchor's script and its pgolf profile at equal wallclock, paired by seed, on one GPU.

    python -m bench.equal_wallclock --anchor pr2135 --data DIR --out bench/results/x.json \\
        [--seconds 180] [--seeds 1337 42] [--arms reference pgolf] [--stub-dir .devrun/fa3_stub] \\
        [--set section.key=value ...]
    python -m bench.equal_wallclock --merge a.json b.json ... --out x.json   # arms run in separate calls

For each seed, the anchor's unmodified script (bench.anchors: its logged runs' settings, the
shards in DIR, MAX_WALLCLOCK_SECONDS=--seconds, its own batch) and then pgolf's stages params ->
prepare -> data_check -> train on the anchor's profile (`prepare.source: fineweb` on the same
shards, one GPU, the same batch and wallclock, the same seed). Each arm: steps, steady ms/step
(median of logged intervals, as bench_vs_ref), the post-EMA float val_bpb and val_loss on the
validation shard in 2048-token windows (the script's own "post-ema" line, EVAL_SEQ_LEN=2048;
pgolf's metrics/train.json val_bpb_float),
seconds to the first step, run seconds, the logged training losses (`loss_curve`) and, for the script,
the last score of the live weights (`live_step_val_loss_val_bpb`: the script's last-step validation
line, pgolf's train.val_live). The script is stopped once its post-EMA line is out
(what follows, GPTQ and evaluation, is not this bench's). The JSON is rewritten after every arm;
`comparison` holds the paired test (pgolf.seeds.paired) of pgolf against the script.

With `--post` each arm runs its whole post-training too (issue "the field's best after
training"): the script to its end (its own quantization, compression and evaluation, at its logged
evaluation length), pgolf through quantize -> compress -> evaluate of the profile. Each arm adds
the final val_bpb / val_loss (the script's last "... val_bpb:... eval_time:...ms" line; pgolf's
metrics/eval.json), that evaluation's seconds, the artifact's total bytes and every evaluation
line of the script (`evals`); `comparison` then pairs the final scores.

The pgolf arm writes params.yaml and the pipeline's outputs of this checkout: run it on a lent
machine or in a scratch clone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import anchors, overrides
from bench.bench_vs_ref import SAFE_ENV, device_info, read_alike, ref_steady, stream

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 25
FIRST_STEADY = 10
PGOLF_STEP = re.compile(r"^step:(\d+)/\d+ train_loss:([\d.]+) .*step_avg:([\d.]+)ms")
STAGES = ("params", "prepare", "data_check", "train")
POST_STAGES = ("quantize", "compress", "evaluate")
LIVE_LINE = re.compile(r"^(?:step:)?(\d+)/\d+ val_loss: ?([\d.]+) val_bpb: ?([\d.]+)")  # the live weights' score
EVAL_LINE = re.compile(r"^(\S.*?) val_loss:([\d.]+) val_bpb:([\d.]+) eval_time:(\d+)ms")
TOTAL_LINE = re.compile(r"^Total submission size[^:]*: (\d+) bytes")
EVAL_SEQ_LEN = 2048  # both arms' post-EMA score: non-overlapping 2048-token windows (pgolf's train.seq_len;
# PR #2135's logged runs evaluate at 2560, which here would score the script with more context)


def steady(marks: list[tuple[int, float]]) -> float | None:
    """bench_vs_ref's steady-state rule (median ms/step over logged intervals from step 10 on,
    stalls over 1.5x the median dropped) on the marks of increasing steps; None without intervals."""
    marks = [m for i, m in enumerate(marks) if i == 0 or m[0] > marks[i - 1][0]]
    med, rates = ref_steady(marks)
    return round(med, 2) if rates else None


def ref_env(anchor: anchors.Anchor, data: Path, seed: int, seconds: float, stub_dir: Path | None,
            post: bool = False) -> dict:
    """The script's env: its logged settings, these shards, seed and wallclock; scored in 2048-token
    windows, or with `post` at its logged evaluation length (its whole evaluation runs)."""
    env = {**os.environ, **SAFE_ENV, **anchor.env, "DATA_PATH": str(data), "TOKENIZER_PATH": str(anchor.tokenizer),
           "SEED": str(seed), "MAX_WALLCLOCK_SECONDS": str(seconds), "TRAIN_LOG_EVERY": str(LOG_EVERY),
           "VAL_LOSS_EVERY": "0", "RUN_ID": f"wallclock{seed}"}
    if not post:
        env["EVAL_SEQ_LEN"] = str(EVAL_SEQ_LEN)
    return anchors.with_stub(env, stub_dir)


def read_evals(lines: list[str]) -> tuple[dict, int | None]:
    """The script's evaluation lines -> ({label: {val_loss, val_bpb, eval_seconds}}, total bytes)."""
    evals, total = {}, None
    for line in lines:
        m = EVAL_LINE.match(line)
        if m:
            evals[m.group(1)] = {"val_loss": float(m.group(2)), "val_bpb": float(m.group(3)),
                                 "eval_seconds": int(m.group(4)) / 1000.0}
        m = TOTAL_LINE.match(line)
        if m:
            total = int(m.group(1))
    return evals, total


def run_reference(anchor: anchors.Anchor, data: Path, seed: int, seconds: float, batch: int, timeout: float,
                  stub_dir: Path | None, post: bool = False) -> dict:
    """The script until its post-EMA evaluation line, or with `post` to its end (or `timeout`)."""
    marks, curve, seen, t0 = [], [], {"stop": None}, time.perf_counter()

    def on_line(line: str) -> bool:
        step = anchor.parse_step(line, batch)
        if step:
            marks.append((step[0], step[2]))
            curve.append([step[0], step[1]])
            seen.setdefault("first", time.perf_counter() - t0)
        live = LIVE_LINE.match(line)
        if live:  # its last one: the live (not averaged) weights at the end of training
            seen["live"] = (int(live.group(1)), float(live.group(2)), float(live.group(3)))
        seen["stop"] = anchor.parse_stop(line) or seen["stop"]
        got = anchor.parse_post_ema(line)
        if got:
            seen.update(val_loss=got[0], val_bpb=got[1])
        return bool(got) and not post

    env = ref_env(anchor, data, seed, seconds, stub_dir, post)
    with tempfile.TemporaryDirectory() as cwd:
        lines, _ = stream([sys.executable, str(anchor.script)], cwd, env, timeout, on_line)
    last = seen["stop"] or (marks[-1] if marks else (0, None))  # (step, training ms)
    out = {"arm": "reference", "seed": seed, "steps": last[0], "step_ms_steady": steady(marks),
           "train_seconds": round(last[1] / 1000.0, 1) if last[1] is not None else None,
           "post_ema_val_bpb": seen.get("val_bpb"), "post_ema_val_loss": seen.get("val_loss"),
           "seconds_to_first_step": round(seen["first"], 1) if "first" in seen else None,
           "live_step_val_loss_val_bpb": seen.get("live"), "loss_curve": curve,
           "log_tail": lines[-8:] if "val_bpb" not in seen else []}
    if post:
        evals, total = read_evals(lines)
        last = evals[list(evals)[-1]] if evals else {}
        out.update(final_val_bpb=last.get("val_bpb"), final_val_loss=last.get("val_loss"),
                   final_eval_seconds=last.get("eval_seconds"), total_bytes=total, evals=evals, log_tail=lines[-8:])
    return out


def pgolf_params(anchor: anchors.Anchor, data: Path, seed: int, seconds: float, batch: int, sets: dict) -> dict:
    """The anchor's profile, on the shards in `data`, one GPU, this seed, batch and wallclock; checked."""
    source, params = overrides.resolve(anchor.profile, REPO)
    common = {"prepare.source": "fineweb", "prepare.corpus": str(data), "prepare.val_source": str(data),
              "prepare.tokenizer": str(anchor.tokenizer), "prepare.workers": 16,
              "train.nproc_per_node": 1, "train.seed": seed, "train.batch_tokens": batch,
              "train.max_wallclock_seconds": seconds, "train.log_every": LOG_EVERY, "train.checkpoint_every": 0,
              "train.val_live": True}
    overrides.apply(params, {**common, **sets}, "equal_wallclock", source)
    from pgolf import config

    config.load_all(params, f"{source} with the bench's overrides")
    return params


def run_pgolf(params: dict, seed: int, timeout: float, post: bool = False) -> dict:
    """pgolf's stages params -> train (with `post`: -> evaluate) in this checkout; its train log read
    as it runs."""
    (REPO / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    metrics_path = REPO / "metrics" / "train.json"
    for name in ("train", "eval", "size"):  # a failed stage must not leave an earlier run's figures
        (REPO / "metrics" / f"{name}.json").unlink(missing_ok=True)
    t0, marks, curve, first, tail = time.perf_counter(), [], [], None, []
    for stage in STAGES + (POST_STAGES if post else ()):
        left = timeout - (time.perf_counter() - t0)

        def on_line(line: str) -> bool:
            m = PGOLF_STEP.match(line)
            if m:
                marks.append((int(m.group(1)), int(m.group(1)) * float(m.group(3))))
                curve.append([int(m.group(1)), float(m.group(2))])
            return False

        lines, first_step = stream([sys.executable, "-m", f"stages.{stage}"], REPO, {**os.environ, **SAFE_ENV}, left,
                                   on_line if stage == "train" else None)
        tail = lines[-8:]
        if stage == "train" and first_step is not None:
            first = first_step
    m = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if m.get("config", {}).get("train", {}).get("seed") != seed:
        return {"arm": "pgolf", "seed": seed, "error": "no metrics/train.json from this run", "log_tail": tail}
    out = {"arm": "pgolf", "seed": seed, "steps": m["steps"], "step_ms_steady": steady(marks),
           "train_seconds": m["train_seconds"], "post_ema_val_bpb": m["val_bpb_float"],
           "post_ema_val_loss": m["val_loss_float"], "exported_weights": m.get("exported_weights"),
           "seconds_to_first_step": round(first, 1) if first else None, "model_params": m.get("model_params"),
           "live_step_val_loss_val_bpb": [m["steps"], m["val_loss_live"], m["val_bpb_live"]] if "val_bpb_live" in m else None,
           "loss_curve": curve}
    if post:
        ev_path, size_path = REPO / "metrics" / "eval.json", REPO / "metrics" / "size.json"
        if not ev_path.exists() or not size_path.exists():
            return {**out, "error": "no metrics/eval.json or size.json from this run", "log_tail": tail}
        ev, size = json.loads(ev_path.read_text()), json.loads(size_path.read_text())
        out.update(final_val_bpb=ev["val_bpb"], final_val_loss=ev["val_loss"], final_eval_seconds=ev["eval_seconds"],
                   quantized_val_bpb=ev.get("val_bpb_pre_ttt", ev["val_bpb"]), ttt_seconds=ev.get("ttt_seconds"),
                   total_bytes=size["total_bytes"])
    return out


def comparison(results: list[dict], key: str = "post_ema") -> dict:
    """pgolf against the script, paired by seed (seeds.paired: gain in nats per token, one-sided t)
    on `key` (post_ema, or final with --post); `no_higher` is the issues' target, pgolf's val_bpb
    <= the script's on every seed."""
    from pgolf.submit import seeds

    def runs(arm: str) -> list:
        out = []
        for r in results:
            bpb, loss = r.get(f"{key}_val_bpb"), r.get(f"{key}_val_loss")
            if r["arm"] == arm and bpb and loss:
                bpt = loss / (bpb * math.log(2))  # bytes per token
                out.append(seeds.Run(f"{arm}_{r['seed']}", "", {"train.seed": r["seed"]}, loss, bpb, bpt))
        return out

    ref, pg = runs("reference"), runs("pgolf")
    try:
        test = seeds.paired(ref, pg)
    except seeds.SeedsError as e:
        return {"test": None, "why": str(e)}
    return {**test, "on": key, "no_higher": all(a <= b for a, b in zip(test["arm_val_bpb"], test["base_val_bpb"]))}


def merge(paths: list[Path]) -> dict:
    """One result from several calls' JSONs (arms run one call each on a lent machine): the first
    one's head, every call's arms, the comparison over all; a failed arm that a later call reran goes
    to `retried`. ValueError unless the calls ran the same anchor, wallclock, batch and GPU, or if
    an arm and seed have results in two files."""
    docs = read_alike(paths, ("what", "seconds", "batch_tokens", "device", "post"))
    rows = [r for d in docs for r in d["results"] if "skipped" not in r]
    results = [r for r in rows if "error" not in r]
    done = [(r["arm"], r["seed"]) for r in results]
    twice = sorted({k for k in done if done.count(k) > 1})
    if twice:
        raise ValueError(f"--merge: arm and seed {twice[0]} have results in two files")
    retried = [r for r in rows if "error" in r and (r["arm"], r["seed"]) in done]  # failed, then rerun
    results += [r for r in rows if "error" in r and (r["arm"], r["seed"]) not in done]
    head = {k: v for k, v in docs[0].items() if k not in ("results", "comparison", "seeds")}
    return {**head, "seeds": sorted({r["seed"] for r in results}), "merged_from": [p.name for p in paths],
            "comparison": comparison(results, "final" if docs[0].get("post") else "post_ema"), "results": results,
            "retried": retried}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--merge":
        ap.add_argument("--merge", type=Path, nargs="+", required=True)
        ap.add_argument("--out", type=Path, required=True)
        a = ap.parse_args(argv)
        try:
            a.out.write_text(json.dumps(merge(a.merge), indent=1) + "\n")
        except ValueError as e:
            ap.error(str(e))
        return 0
    ap.add_argument("--anchor", required=True, help=f"one of {', '.join(anchors.ANCHORS)}")
    ap.add_argument("--data", type=Path, required=True, help="the shards both programs read")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=180.0, help="training wallclock of every arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    ap.add_argument("--batch-tokens", type=int, default=786432, help="tokens per step (the scripts' default)")
    ap.add_argument("--stub-dir", type=Path, default=None, help="folder holding a flash_attn_interface stand-in")
    ap.add_argument("--set", nargs="*", default=[], help="pgolf overrides, section.key=value")
    ap.add_argument("--arms", nargs="+", default=["reference", "pgolf"], choices=["reference", "pgolf"])
    ap.add_argument("--budget", type=float, default=0.0, help="seconds for all arms; later arms are skipped")
    ap.add_argument("--post", action="store_true", help="each arm runs its post-training too; compare final scores")
    a = ap.parse_args(argv)
    try:
        anchor = anchors.get(a.anchor)
        sets = overrides.parse(a.set, "--set")
        params = {s: pgolf_params(anchor, a.data.resolve(), s, a.seconds, a.batch_tokens, sets) for s in a.seeds}
    except ValueError as e:
        ap.error(str(e))
    for path in (a.data, anchor.script, anchor.tokenizer):
        if not path.exists():
            ap.error(f"{path} does not exist")
    stub = a.stub_dir.resolve() if a.stub_dir else None
    head = {"what": f"{a.anchor} script vs pgolf profile {anchor.profile!r}, equal wallclock, paired seeds, one GPU",
            **device_info(), "data": str(a.data), "seconds": a.seconds, "batch_tokens": a.batch_tokens,
            "seeds": a.seeds, "post": a.post, "reference_attention": "FlashAttention-3 stand-in: " + (
                (stub / "flash_attn_interface.py").read_text().split('"""')[1].strip() if stub else "none")}
    results, t_all = [], time.perf_counter()
    for seed in a.seeds:
        for arm in a.arms:
            left = (a.budget - (time.perf_counter() - t_all)) if a.budget > 0 else 3600.0
            if left < a.seconds + 30:
                results.append({"arm": arm, "seed": seed, "skipped": "budget"})
                continue
            t0 = time.perf_counter()
            r = (run_reference(anchor, a.data.resolve(), seed, a.seconds, a.batch_tokens, left, stub, a.post)
                 if arm == "reference" else run_pgolf(params[seed], seed, left, a.post))
            r["run_seconds"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
            key = "final" if a.post else "post_ema"
            a.out.write_text(json.dumps({**head, "comparison": comparison(results, key), "results": results},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
