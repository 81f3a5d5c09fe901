"""Seeds and significance: several runs of the same params, and whether they beat a baseline.

Run N seeds as DVC experiments (README "Seeds and significance"):

    dvc exp run --queue -S train.seed=1337 && dvc exp run --queue -S train.seed=42 \
        && dvc exp run --queue -S train.seed=2025 && dvc queue start -j 1 && dvc queue logs -f <exp>
    pgolf seeds --baseline-bpb 1.1194 --out seeds/

This module reads the experiments (`dvc exp show --json`), checks that they differ only in
`train.seed`, and tests the improvement over the baseline one-sided, in nats per token as the
challenge's rule states it (a record must beat the best by 0.005 nats at p < 0.01): the baseline
val_bpb becomes nats per token with each run's own bytes per token (val_loss = val_bpb * ln 2 *
bytes / tokens), d_i = baseline_loss - val_loss_i, and t = (mean d - 0.005) / (sd d / sqrt n)
with n - 1 degrees of freedom (Student's t, implemented here: `t_cdf`). With `--out` it writes
seeds.json (the summary) and each seed's train log, which the export copies.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pgolf.shared import layout, train_files

MIN_NATS = 0.005
ALPHA = 0.01
SEED_KEY = "train.seed"
TRAIN_LOG = (layout.TRAIN / train_files.LOG_FILE).as_posix()  # read at each experiment's rev


class SeedsError(ValueError):
    """Runs that cannot be summarised (fewer than 2, different params, missing metrics or logs)."""


# ----------------------------------------------------------------------------- Student's t


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converged to 1e-15."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return f


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


# ----------------------------------------------------------------------------- runs and the test


@dataclass(frozen=True)
class Run:
    name: str
    rev: str
    params: dict  # flat {"section.key": value}
    val_loss: float  # nats per token
    val_bpb: float
    bytes_per_token: float

    @property
    def seed(self):
        return self.params.get(SEED_KEY)


def flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_runs(runs: list[Run]) -> None:
    """At least 2 runs, distinct seeds, identical params otherwise; SeedsError naming what differs."""
    if len(runs) < 2:
        raise SeedsError(f"{len(runs)} run(s) with metrics/eval.json; a seed summary needs at least 2")
    ref = runs[0]
    for r in runs[1:]:
        keys = sorted(k for k in set(ref.params) | set(r.params) if k != SEED_KEY and ref.params.get(k) != r.params.get(k))
        if keys:
            k = keys[0]
            raise SeedsError(f"runs {ref.name} and {r.name} differ in params beyond {SEED_KEY}: {k} = "
                             f"{ref.params.get(k)!r} vs {r.params.get(k)!r}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""))
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SeedsError(f"two runs share a seed ({SEED_KEY} values {seeds})")


def one_sided(gain: list[float], min_nats: float = MIN_NATS, alpha: float = ALPHA) -> dict:
    """The test of mean(gain) > min_nats (nats per token), one-sided Student's t with n - 1 df."""
    n = len(gain)
    mean, sd = statistics.fmean(gain), statistics.stdev(gain)
    t = (mean - min_nats) / (sd / math.sqrt(n)) if sd > 0 else (math.inf if mean > min_nats else -math.inf)
    p = 1.0 - t_cdf(t, n - 1) if math.isfinite(t) else (0.0 if t > 0 else 1.0)
    return {"improvement_nats_mean": mean, "improvement_nats_std": sd, "min_improvement_nats": min_nats,
            "alpha": alpha, "t": t, "df": n - 1, "p_value": p, "significant": bool(mean > min_nats and p < alpha)}


def nats_gain(baseline_bpb: float, run: Run) -> float:
    """(baseline - run) in nats per token of the run (its own bytes per token: bpb compares across
    tokenizers, nats per token does not)."""
    return (baseline_bpb - run.val_bpb) * math.log(2) * run.bytes_per_token


def summarize(runs: list[Run], baseline_bpb: float, min_nats: float = MIN_NATS, alpha: float = ALPHA) -> dict:
    """Mean, std and the one-sided test of (baseline - run) > min_nats nats per token."""
    check_runs(runs)
    bpb = [r.val_bpb for r in runs]
    loss = [r.val_loss for r in runs]
    return {"runs": [{"name": r.name, "rev": r.rev, "seed": r.seed, "val_bpb": r.val_bpb, "val_loss": r.val_loss}
                     for r in runs],
            "n": len(runs), "val_bpb_mean": statistics.fmean(bpb), "val_bpb_std": statistics.stdev(bpb),
            "val_loss_mean": statistics.fmean(loss), "val_loss_std": statistics.stdev(loss),
            "baseline_val_bpb": baseline_bpb,
            **one_sided([nats_gain(baseline_bpb, r) for r in runs], min_nats, alpha)}


def paired(base: list[Run], arm: list[Run], min_nats: float = MIN_NATS, alpha: float = ALPHA) -> dict:
    """The same test for two arms run with the same seeds on one machine: each seed's gain is the
    arm's over the base run of that seed (`nats_gain`). SeedsError unless both arms pass
    `check_runs` and hold the same seeds."""
    check_runs(base)
    check_runs(arm)
    by_seed = {r.seed: r for r in base}
    if sorted(by_seed) != sorted(r.seed for r in arm):
        raise SeedsError(f"arms are not paired: base seeds {sorted(by_seed)}, arm seeds {sorted(r.seed for r in arm)}")
    gain = [nats_gain(by_seed[r.seed].val_bpb, r) for r in arm]
    return {"n": len(arm), "seeds": [r.seed for r in arm],
            "base_val_bpb": [by_seed[r.seed].val_bpb for r in arm], "arm_val_bpb": [r.val_bpb for r in arm],
            **one_sided(gain, min_nats, alpha)}


def render(s: dict) -> str:
    verdict = "MEETS" if s["significant"] else "does NOT meet"
    lines = [f"seeds: {s['n']} runs, val_bpb {s['val_bpb_mean']:.5f} ± {s['val_bpb_std']:.5f} (mean ± std), "
             f"val_loss {s['val_loss_mean']:.5f} ± {s['val_loss_std']:.5f} nats/token"]
    lines += [f"  {r['name']:<24} seed {r['seed']!s:<8} val_bpb {r['val_bpb']:.5f}  val_loss {r['val_loss']:.5f}"
              for r in s["runs"]]
    lines.append(f"  improvement over baseline val_bpb {s['baseline_val_bpb']:.5f}: {s['improvement_nats_mean']:.5f} ± "
                 f"{s['improvement_nats_std']:.5f} nats/token; one-sided t = {s['t']:.3f} (df {s['df']}), "
                 f"p = {s['p_value']:.4g} for H0: improvement <= {s['min_improvement_nats']} nats")
    lines.append(f"  {verdict} the rule: > {s['min_improvement_nats']} nats at p < {s['alpha']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reading DVC experiments


def _run_of(entry: dict) -> Run | None:
    """A Run from one `dvc exp show --json` revision entry; None without eval metrics."""
    data = entry.get("data") or {}
    ev = ((data.get("metrics") or {}).get(layout.EVAL_METRICS.as_posix()) or {}).get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    if "val_bpb" not in ev or "val_loss" not in ev:
        return None
    tokens, nbytes = ev.get("scored_tokens"), ev.get("scored_bytes")
    if not tokens or not nbytes:
        raise SeedsError(f"experiment {entry.get('name') or entry.get('rev')}: metrics/eval.json lacks "
                         f"scored_tokens/scored_bytes")
    return Run(entry.get("name") or str(entry.get("rev"))[:7], str(entry.get("rev")), flatten(params),
               float(ev["val_loss"]), float(ev["val_bpb"]), nbytes / tokens)


def runs_from_exp_show(doc: list, names: list[str] | None = None) -> list[Run]:
    """Finished experiments of `dvc exp show --json` (all, or those named), baseline commits excluded."""
    runs = []
    for commit in doc:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                run = _run_of(rev)
                if run is not None and (not names or run.name in names):
                    runs.append(run)
    if names:
        missing = sorted(set(names) - {r.name for r in runs})
        if missing:
            raise SeedsError(f"experiment(s) {', '.join(missing)}: not found with metrics/eval.json in `dvc exp show`")
    return runs


def exp_show(root: Path) -> list:
    p = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True)
    if p.returncode != 0:
        raise SeedsError(f"`dvc exp show --json` failed in {root}: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)


def read_log(root: Path, run: Run) -> str:
    """The train log of an experiment, from the DVC cache of `root`."""
    import dvc.api

    try:
        return dvc.api.read(TRAIN_LOG, repo=str(root), rev=run.rev)
    except Exception as e:  # noqa: BLE001 - dvc raises many kinds (missing cache, path not found)
        raise SeedsError(f"experiment {run.name}: train log {TRAIN_LOG} not readable ({type(e).__name__}: {e})") from None


def write_out(out: Path, summary: dict, logs: dict[str, str]) -> None:
    """seeds.json + train_seed<seed>.log per run, staged and swapped in (nothing half-written)."""
    from pgolf.shared.io import atomic_write_text, staged_dir, write_json

    with staged_dir(out) as tmp:
        write_json(tmp / "seeds.json", summary)
        for name, text in logs.items():
            atomic_write_text(tmp / name, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgolf seeds", description="Summarise seed runs (DVC experiments) and test them against a baseline.")
    ap.add_argument("--baseline-bpb", type=float, required=True, help="val_bpb of the run to beat")
    ap.add_argument("--exp", nargs="*", default=None, help="experiment names (default: every finished one)")
    ap.add_argument("--out", type=Path, help="write seeds.json and each seed's train log here")
    ap.add_argument("--root", type=Path, default=Path("."))
    a = ap.parse_args(argv)
    try:
        runs = runs_from_exp_show(exp_show(a.root), a.exp)
        s = summarize(runs, a.baseline_bpb)
        if a.out:
            write_out(a.out, s, {f"train_seed{r.seed}.log": read_log(a.root, r) for r in runs})
    except SeedsError as e:
        print(f"seeds: error: {e}", file=sys.stderr)
        return 1
    print(render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
