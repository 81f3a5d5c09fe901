"""Time phased score-first LoRA TTT (pgolf.evaluate.phased.eval_phased, as the evaluate stage runs it)
on one device, and project it to PR #2135's validation set on 8 GPUs.

GPU:  python -m bench.bench_phased --tokens SHARDS/fineweb_val_000000.bin --out x.json [--batches 8] [--ops]
      (the pr2135 profile's model, random init: the time of TTT does not depend on the weights)
CPU:  python -m bench.bench_phased --small --out /tmp/bench_phased.json   (smoke test: the tiny profile,
      the test fixture's document lengths, a set of 64 documents in batches of 16)

The set: PR #2135 scores 50,000 documents (47,851,520 targets; its logged phased evaluation took 540.1 s on
8 GPUs, train_seed42.log). They are modelled as 50,000 lengths drawn (seeded) from the documents of
--tokens and cut into eval_phased's batches (`batches`: 64 documents of near-equal length each).

What is timed: a batch's time depends on its shape, not on its tokens, so --batches K of the set's batches,
spaced geometrically in work from the lightest to the heaviest under --cap row tokens, are each built as a
stream of random token ids (`stream_of`) and run on their own. A line through the origin fitted to them,
    seconds = a x chunk steps + b x row tokens
(a: a step's fixed cost, its launches; b: the cost of one token position), gives every batch of the set a
time. Their sum, scaled to 47,851,520 targets, over 8 GPUs, is the projection. Row tokens: per chunk step,
the batch's unfinished documents x the window width (`batch_work`). The global pass (over 2,500 documents
in PR #2135) is not in it: ttt_prefix_docs is 0 here.

With evaluate.ttt_compile on a GPU, a first run over a few documents made to need every graph
(`warm_lengths`) builds them (cold_seconds, graphs_cold); graphs_after says whether the timed runs
compiled more. Each batch's line is printed and written as it ends, so a run stopped early keeps what
it measured. --ops adds torch.profiler's top operators over the median chosen batch.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from bench import overrides
from bench.bench_eval import FIXTURE, synthetic_tables, versions
from bench.timing import timed
from pgolf.evaluate.phased import batch_chunks, batches, documents, done_rows, eval_phased, step_width
from pgolf.shared.io import write_json
from pgolf.shared.model import GPT
from pgolf.shared.shards import BOS_ID, read_shard

PR2135_VAL_TOKENS, PR2135_GPUS, PR2135_SECONDS, PR2135_DOCS = 47_851_520, 8, 540.1, 50_000


def batch_work(rows: np.ndarray, chunk: int, context: int) -> tuple[int, int]:
    """(chunk steps, row tokens) of one batch of documents `rows` (n, 2) (start, length) in
    eval_phased: per step, its unfinished documents x the window width."""
    steps = batch_chunks(rows, chunk)
    work = sum((len(rows) - done_rows(rows, ci, chunk)) * step_width(ci, chunk, context) for ci in range(steps))
    return steps, work


def set_costs(lengths: np.ndarray, batch: int, chunk: int, context: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents of these lengths cut as eval_phased cuts them -> (each batch's lengths, (G, 2) int64
    chunk steps and row tokens of each batch)."""
    docs = np.stack([np.zeros_like(lengths), lengths], axis=1)
    groups = [lengths[g] for g in batches(docs, batch)]
    costs = np.array([batch_work(np.stack([np.zeros_like(g), g], 1), chunk, context) for g in groups], dtype=np.int64)
    return groups, costs


def pick(costs: np.ndarray, k: int, cap: int | None = None) -> np.ndarray:
    """Indices of up to k batches spaced geometrically in work (row tokens), from the lightest to the
    heaviest of those with at most `cap` row tokens (the lightest batch if none is that light): the
    light ones pin a step's fixed cost, the heavy ones a token's."""
    order = np.argsort(costs[:, 1], kind="stable")
    w = costs[order, 1]
    under = max(1, int(np.searchsorted(w, cap, side="right"))) if cap is not None else len(w)
    at = np.searchsorted(w[:under], np.geomspace(max(int(w[0]), 1), max(int(w[under - 1]), 1), k))
    return order[np.unique(np.clip(at, 0, under - 1))]


def stream_of(lengths: np.ndarray, vocab: int, seed: int = 0) -> np.ndarray:
    """A BOS-led stream whose `documents` are exactly these lengths (each >= 2): a document is its BOS,
    length - 2 random non-BOS ids and the next document's BOS (a last BOS closes the stream)."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in lengths.tolist():
        body = rng.integers(0, vocab - 1, n - 2)
        parts += [[BOS_ID], body + (body >= BOS_ID)]  # ids other than BOS
    return np.concatenate(parts + [[BOS_ID]]).astype(np.int64)


def warm_lengths(batch: int, chunk: int, context: int) -> np.ndarray:
    """Document lengths whose batches meet every shape a compiled chunk step is built for: a first
    step whose window equals the chunk, wider windows up to `context`, a full batch, a short one,
    and a last document alone in its batch."""
    short = [chunk // 2 + 2] * min(5, batch - 1)
    mid = [2 * chunk + 4] * (batch - 1)
    return np.array(short + mid + [context + 3 * chunk])


def fit(costs: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """Least squares of seconds = a * steps + b * row tokens through the origin, a and b >= 0 (a
    negative one is dropped and the other refitted alone)."""
    X = costs.astype(np.float64)
    a, b = np.linalg.lstsq(X, seconds, rcond=None)[0]
    if a >= 0 and b >= 0:
        return float(a), float(b)
    col = 1 if a < 0 else 0
    only = float(X[:, col] @ seconds / (X[:, col] @ X[:, col]))
    return (0.0, only) if col == 1 else (only, 0.0)


def project(costs: np.ndarray, a: float, b: float, targets: int) -> float:
    """Seconds of the whole set on PR2135_GPUS, scaled from `targets` to PR #2135's."""
    return float((costs @ np.array([a, b])).sum()) * PR2135_VAL_TOKENS / targets / PR2135_GPUS


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def ops_table(fn, device) -> list[dict]:
    """fn() under torch.profiler -> its 15 most expensive operators (device time on CUDA, else CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:15]
    return [{"op": e.key, "calls": e.count, "ms": round(getattr(e, key) / 1e3, 2)} for e in rows]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", help="a validation shard: its document lengths model the set (default with --small: "
                                     "the test fixture)")
    ap.add_argument("--small", action="store_true", help="CPU smoke test: the tiny profile, batches of 16")
    ap.add_argument("--docs", type=int,
                    help=f"documents in the modelled set (default {PR2135_DOCS:,}; 64 with --small)")
    ap.add_argument("--batches", type=int, default=8, help="batches of the set to time (>= 2)")
    ap.add_argument("--cap", type=int, default=20_000_000, help="time only batches of at most this many row tokens "
                                                                 "(the fit extrapolates to the heavier ones)")
    ap.add_argument("--seed", type=int, default=0, help="the draw of the set's lengths")
    ap.add_argument("--set", nargs="*", default=[], help="overrides, section.key=value")
    ap.add_argument("--ops", action="store_true", help="add torch.profiler's top operators (one more run)")
    a = ap.parse_args(argv)
    if a.batches < 2:
        ap.error(f"--batches {a.batches}: must be >= 2 (two points fit the line)")
    if a.docs is None:
        a.docs = 64 if a.small else PR2135_DOCS
    if a.docs < 1:
        ap.error(f"--docs {a.docs}: must be >= 1")
    if not (a.tokens or a.small):
        ap.error("--tokens: a validation shard is needed (or --small for the test fixture)")
    try:
        sets = overrides.parse(a.set, "--set")
        lengths = documents(read_shard(a.tokens or FIXTURE), BOS_ID)[:, 1]
        sets.update({"evaluate.ttt_scheme": "phased", "evaluate.ttt_enabled": True, "evaluate.ttt_prefix_docs": 0})
        if a.small:
            sets.setdefault("evaluate.ttt_doc_batch", 16)
        cfgs = overrides.load("tiny" if a.small else "pr2135", sets)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    return a, lengths, cfgs


def main(argv=None) -> int:
    a, lengths, cfgs = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    mcfg, ecfg = cfgs["model"], cfgs["evaluate"]
    drawn = np.random.default_rng(a.seed).choice(lengths, a.docs)
    groups, costs = set_costs(drawn, ecfg.ttt_doc_batch, ecfg.ttt_doc_chunk, ecfg.context)
    chosen = pick(costs, a.batches, a.cap)
    torch.manual_seed(0)
    model = GPT(mcfg, train_seq_len=ecfg.context).to(device)  # no global pass: eval_phased leaves it as it is
    tables = synthetic_tables(mcfg.vocab_size)

    def run(lengths, seed=0):  # -> seconds of eval_phased over documents of these lengths
        return timed(eval_phased, model, stream_of(lengths, mcfg.vocab_size, seed), tables, ecfg, device,
                     sync_device=device)[1]

    out = {**versions(), "device": str(device), "profile": "tiny" if a.small else "pr2135",
           "lengths_from": str(a.tokens or FIXTURE), "set": {"docs": len(drawn), "batches": len(groups),
                                                             "targets": int((drawn - 1).sum()), "seed": a.seed},
           "evaluate": {k: getattr(ecfg, k) for k in ("context", "ttt_rank", "ttt_doc_batch", "ttt_doc_chunk",
                                                      "ttt_sites", "ttt_compile")},
           "cap_row_tokens": a.cap, "work_share_above_cap": round(float(costs[costs[:, 1] > a.cap, 1].sum()
                                                                        / costs[:, 1].sum()), 4),
           "cold_seconds": None, "timed": [],
           "note": "random-init weights and random token ids (timing only); no global pass"}
    if ecfg.ttt_compile and device.type == "cuda":  # every graph built first, on a set made to need them all
        out["cold_seconds"] = round(run(warm_lengths(ecfg.ttt_doc_batch, ecfg.ttt_doc_chunk, ecfg.context)), 3)
        out["graphs_cold"] = graphs()
        print(f"bench_phased: cold run {out['cold_seconds']:.1f} s, {out['graphs_cold']} graphs built", flush=True)
    for g in chosen:
        secs = run(groups[g], int(g))
        out["timed"].append({"batch": int(g), "docs": len(groups[g]), "max_length": int(groups[g].max()),
                             "steps": int(costs[g, 0]), "row_tokens": int(costs[g, 1]), "seconds": round(secs, 3)})
        write_json(a.out, out)
        print(f"bench_phased: batch {g} ({len(groups[g])} docs up to {groups[g].max()} tokens, {costs[g, 0]} steps, "
              f"{costs[g, 1]:,} row tokens) {secs:.2f} s", flush=True)
    t = out["timed"]
    out["graphs_after"] = graphs()  # more than graphs_cold: the timed runs compiled too
    coef = fit(np.array([[r["steps"], r["row_tokens"]] for r in t]), np.array([r["seconds"] for r in t]))
    seconds = project(costs, *coef, out["set"]["targets"])
    out["projection"] = {"seconds_per_step": coef[0], "seconds_per_row_token": coef[1], "gpus": PR2135_GPUS,
                         "targets": PR2135_VAL_TOKENS, "seconds": round(seconds, 1),
                         "pr2135_logged_seconds": PR2135_SECONDS}
    write_json(a.out, out)
    print(f"bench_phased: {out['profile']} on {out['gpu'] or 'cpu'}: {len(t)} of {len(groups)} batches timed; "
          f"projected {seconds:.0f} s for {PR2135_VAL_TOKENS:,} targets on {PR2135_GPUS} GPUs "
          f"(PR #2135 logged {PR2135_SECONDS} s) -> {a.out}", flush=True)
    if a.ops:
        g = chosen[len(chosen) // 2]
        out["ops"] = ops_table(lambda: run(groups[g], int(g)), device)
        write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
