"""Time phased score-first LoRA TTT (pgolf.evaluate.phased.eval_phased, as the evaluate stage runs it)
on one device, and project it to PR #2135's validation set on 8 GPUs.

GPU:  python -m bench.bench_phased --tokens SHARDS/fineweb_val_000000.bin --docs 300 --out x.json [--ops]
      (the pr2135 profile's model, random init: the time of TTT does not depend on the weights)
CPU:  python -m bench.bench_phased --small --docs 8 --out /tmp/bench_phased.json   (smoke test: the
      tiny profile's model on the 20k-token test fixture)

Scores the first --docs documents of the shard (cut before the BOS that starts document docs+1) with
the profile's evaluate.* settings (--set section.key=value overrides them; ttt_prefix_docs is scaled by
default to the same share of the documents as PR #2135's 2,500 of 50,000, so a global pass runs).
--ops adds torch.profiler's top operators of the timed run. With evaluate.ttt_compile on a GPU, a first
run builds the graphs (cold_seconds) and the timed run is the second (seconds).

The projection to PR #2135's 47,851,520 validation tokens on 8 GPUs (its logged phased evaluation
took 540.1 s, train_seed42.log) scales the time by work, not by tokens: a chunk step runs a window
for every unfinished document of its batch, so a few hundred documents of mixed lengths cost far
more per token than 50,000 do (each batch of 64 then holds near-equal lengths). Work is the token
positions the chunk steps run (`row_tokens`); the full set's is that of 50,000 documents drawn
(seeded) from the lengths of every document in the shard, scaled to 47,851,520 tokens. The global
pass is not in the projection (a sample's prefix is too small for it to run).
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

PR2135_VAL_TOKENS, PR2135_GPUS, PR2135_SECONDS, PR2135_PREFIX_SHARE = 47_851_520, 8, 540.1, 2500 / 50000
PR2135_DOCS = 50_000


def first_docs(tokens: np.ndarray, n: int) -> np.ndarray:
    """The stream up to (not including) the BOS that starts document n+1; all of it if shorter."""
    docs = documents(tokens, BOS_ID)  # (D, 2) start, length
    if len(docs) <= n:
        return tokens
    return tokens[:int(docs[n, 0]) + 1]  # +1: the last document's final target is that BOS


def row_tokens(docs: np.ndarray, batch: int, chunk: int, context: int) -> int:
    """Token positions the chunk steps of eval_phased run for the documents `docs` (n, 2) (start,
    length): per step, the batch's unfinished documents x the window width."""
    work = 0
    for g in batches(docs, batch):
        rows = docs[g]
        for ci in range(batch_chunks(rows, chunk)):
            work += (len(rows) - done_rows(rows, ci, chunk)) * step_width(ci, chunk, context)
    return work


def full_set_work(lengths: np.ndarray, batch: int, chunk: int, context: int, seed: int = 0) -> float:
    """Work per token of PR #2135's validation set: 50,000 documents drawn from `lengths`."""
    drawn = np.random.default_rng(seed).choice(lengths, PR2135_DOCS)
    docs = np.stack([np.zeros_like(drawn), drawn], axis=1)
    return row_tokens(docs, batch, chunk, context) / float((drawn - 1).sum())


def ops_table(fn, device) -> list[dict]:
    """fn() under torch.profiler -> its 15 most expensive operators (device time on CUDA, else CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:15]
    return [{"op": e.key, "calls": e.count, "ms": round(getattr(e, key) / 1e3, 2)} for e in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", help="a validation shard (default: the tiny test fixture with --small)")
    ap.add_argument("--small", action="store_true", help="CPU smoke test: the tiny profile")
    ap.add_argument("--docs", type=int, default=300, help="score the first N documents")
    ap.add_argument("--set", nargs="*", default=[], help="overrides, section.key=value")
    ap.add_argument("--ops", action="store_true", help="add torch.profiler's top operators (a second run)")
    a = ap.parse_args(argv)
    if a.docs < 1:
        ap.error(f"--docs {a.docs}: must be >= 1")
    if not (a.tokens or a.small):
        ap.error("--tokens: a validation shard is needed (or --small for the test fixture)")
    profile = "tiny" if a.small else "pr2135"
    try:
        sets = overrides.parse(a.set, "--set")
        shard = read_shard(a.tokens or FIXTURE)
        tokens = first_docs(shard, a.docs)
        docs = documents(tokens, BOS_ID)  # (D, 2) start, length
        n_docs = len(docs)
        sets.setdefault("evaluate.ttt_scheme", "phased")
        sets.setdefault("evaluate.ttt_enabled", True)
        sets.setdefault("evaluate.ttt_prefix_docs", max(1, round(n_docs * PR2135_PREFIX_SHARE)))
        cfgs = overrides.load(profile, sets)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    mcfg, ecfg = cfgs["model"], cfgs["evaluate"]
    torch.manual_seed(0)
    tables = synthetic_tables(mcfg.vocab_size)

    def fresh():  # the global pass adapts the model in place: each run takes a new one
        return GPT(mcfg, train_seq_len=ecfg.context).to(device)

    cold = None  # with evaluate.ttt_compile: a first run that builds the graphs, timed on its own
    if ecfg.ttt_compile and device.type == "cuda":
        _, cold = timed(eval_phased, fresh(), tokens, tables, ecfg, device, sync_device=device)
    r, secs = timed(eval_phased, fresh(), tokens, tables, ecfg, device, sync_device=device)
    T = len(tokens) - 1
    shape = (ecfg.ttt_doc_batch, ecfg.ttt_doc_chunk, ecfg.context)
    work = row_tokens(docs, *shape)
    per_token = full_set_work(documents(shard, BOS_ID)[:, 1], *shape)
    projected = secs / work * per_token * PR2135_VAL_TOKENS / PR2135_GPUS
    out = {**versions(), "device": str(device), "profile": profile, "tokens_file": str(a.tokens or FIXTURE),
           "docs": r.docs, "tokens": T, "chunks": r.chunks, "global_steps": r.global_steps,
           "evaluate": {k: getattr(ecfg, k) for k in ("context", "ttt_rank", "ttt_doc_batch", "ttt_doc_chunk",
                                                      "ttt_prefix_docs", "ttt_phases", "ttt_sites")},
           "seconds": round(secs, 3), "tokens_per_second": round(T / secs, 1),
           "cold_seconds": None if cold is None else round(cold, 3),
           "row_tokens": work, "row_tokens_per_token": round(work / T, 2),
           "projection": {"tokens": PR2135_VAL_TOKENS, "gpus": PR2135_GPUS, "seconds": round(projected, 1),
                          "row_tokens_per_token": round(per_token, 2), "pr2135_logged_seconds": PR2135_SECONDS,
                          "how": "seconds / sample row tokens x full-set row tokens / GPUs (module docstring)"},
           "note": "random-init weights (timing only); synthetic byte tables, so val_bpb means nothing"}
    write_json(a.out, out)
    if a.ops:  # written first without them, so a run stopped here keeps its timing
        model = fresh()
        out["ops"] = ops_table(lambda: eval_phased(model, tokens, tables, ecfg, device), device)
        write_json(a.out, out)
    print(f"bench_phased: {profile} on {out['gpu'] or 'cpu'}: {r.docs} docs, {T:,} tokens, {r.chunks} chunk steps, "
          f"{r.global_steps} global steps in {secs:.1f} s ({T / secs:,.0f} tokens/s); "
          f"projected {projected:.0f} s for {PR2135_VAL_TOKENS:,} tokens on {PR2135_GPUS} GPUs -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
