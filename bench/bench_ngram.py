"""Time the n-gram tilt's state (pgolf.evaluate.ngram_tilt) on this CPU and project it to the full
validation set on 8 GPUs.

    python -m bench.bench_ngram [--out bench/results/ngram_tilt_cpu.json]

Measures `stream_hints` (the vectorised pass evaluate runs: order 16, threshold 0.8) over the official
1.04M-token validation prefix, then over longer streams built from it (copies whose token ids go
through a random permutation of the vocabulary: the prefix's repeat statistics, new contexts), up
to 60 copies = 62.4M tokens, about the whole validation set; each the fastest of 3 runs (2 for the
longest), as other work on a shared box only slows a run. Also the pure-Python reference
`OnlineNgram` on a slice. With a C compiler
and ../shared/anchors present it also times PR #2135's C state on the prefix, for reference only
(pgolf compiles nothing). Peak host memory of a pass comes from tracemalloc (numpy's buffers).

The projection: the state is host-side and sequential over the stream, so each of the 8 ranks
computes the hints of the whole stream (on its own cores, at the same time): the per-rank wall time
is the whole stream's, scaled as a * N log2 N from the longest measured stream to 62M tokens.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pgolf.evaluate import ngram_tilt as nt  # noqa: E402
from pgolf.shared.io import write_json  # noqa: E402
from pgolf.shared.shards import read_shard  # noqa: E402

OFFICIAL = ROOT.parent / "shared/data/fineweb_sp1024_val_prefix/fineweb_val_000000.bin"
ANCHOR = ROOT.parent / "shared/anchors/pr2135"
FULL_TOKENS = 62_000_000  # the validation set, about
RANKS = 8
EVAL_BUDGET_S = 600.0


def best_of(fn, repeats: int) -> tuple[float, object]:
    """(the fastest of `repeats` calls' wall seconds, the last result): other work on the box only slows a call."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_bytes(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def longer(tokens: np.ndarray, copies: int, vocab: int, seed: int = 0) -> np.ndarray:
    """`copies` copies of `tokens`, each after the first through its own random vocabulary permutation."""
    rng = np.random.default_rng(seed)
    parts = [tokens] + [rng.permutation(vocab).astype(np.uint16)[tokens] for _ in range(copies - 1)]
    return np.concatenate(parts)


def anchor_c_seconds(tokens: np.ndarray, order: int) -> dict | None:
    """PR #2135's C token state over `tokens` (built in a temp folder; reference only), or None."""
    cc = shutil.which("cc") or shutil.which("gcc")
    src = ANCHOR / "online_ngram_state.c"
    if cc is None or not src.is_file():
        return None
    import ctypes

    with tempfile.TemporaryDirectory() as tmp:
        lib_path = Path(tmp) / "libngram.so"
        flags = ["-O3", "-march=native"]  # as the anchor builds it
        subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(lib_path), str(src)], check=True)
        lib = ctypes.CDLL(str(lib_path))
        lib.online_ngram_state_create.restype = ctypes.c_void_p
        lib.online_ngram_state_create.argtypes = [ctypes.c_int] * 3
        lib.online_ngram_state_destroy.argtypes = [ctypes.c_void_p]
        lib.online_ngram_state_seed_prefix_token.argtypes = [ctypes.c_void_p, ctypes.c_uint16]
        lib.online_ngram_state_process_chunk.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + \
            [ctypes.c_void_p] * 7
        y = np.ascontiguousarray(tokens[1:], dtype=np.uint16)
        n = len(y)
        ones = np.ones(1 << 16, np.uint8)  # every token starts a word: the within-word channel idles
        zeros = np.zeros(1 << 16, np.uint8)
        outs = [np.zeros(n, np.uint16), np.zeros(n, np.float32), np.zeros(n, np.uint16), np.zeros(n, np.float32),
                np.zeros(n, np.uint8)]
        bits = max(12, min(28, math.ceil(math.log2(n / 0.55))))

        def run():
            st = lib.online_ngram_state_create(order - 1, bits, 12)
            lib.online_ngram_state_seed_prefix_token(st, int(tokens[0]))
            rc = lib.online_ngram_state_process_chunk(st, y.ctypes.data, n, ones.ctypes.data, zeros.ctypes.data,
                                                      *[o.ctypes.data for o in outs])
            lib.online_ngram_state_destroy(st)
            assert rc == 0, rc

        seconds, _ = best_of(run, 3)
    return {"what": "PR #2135 online_ngram_state.c token channel (reference only; gcc " + " ".join(flags) + ")",
            "tokens": n, "seconds": round(seconds, 4), "tokens_per_second": round(n / seconds)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/ngram_tilt_cpu.json")
    ap.add_argument("--tokens", type=Path, default=OFFICIAL, help="a fineweb_val_*.bin shard")
    ap.add_argument("--order", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--copies", default="4,16,60", help="longer streams: this many permuted copies of the shard "
                    "(60: 62.4M tokens, about the full validation set)")
    ap.add_argument("--python-tokens", type=int, default=100_000, help="slice for the pure-Python reference")
    a = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    tokens = read_shard(a.tokens)
    vocab = int(tokens.max()) + 1
    vocab = 1 << max(10, (vocab - 1).bit_length())

    rows = []
    for copies in [1, *[int(c) for c in a.copies.split(",") if c]]:
        stream = tokens if copies == 1 else longer(tokens, copies, vocab)
        seconds, hints = best_of(lambda: nt.stream_hints(stream, a.order, a.threshold), 3 if copies <= 16 else 2)
        rows.append({"tokens": len(stream), "copies": copies, "seconds": round(seconds, 3),
                     "tokens_per_second": round(len(stream) / seconds),
                     "peak_bytes": peak_bytes(lambda: nt.stream_hints(stream, a.order, a.threshold)),
                     "hinted": int((hints >= 0).sum())})
        print(f"stream_hints: {len(stream):>11,} tokens  {seconds:7.2f} s  {len(stream) / seconds:>12,.0f} tok/s  "
              f"peak {rows[-1]['peak_bytes'] / 2**20:,.0f} MiB", flush=True)
        del stream

    n_py = min(a.python_tokens, len(tokens) - 1)

    def python_ref():
        st = nt.OnlineNgram(a.order, int(tokens[0]))
        return [st.step(t) for t in tokens[1:n_py + 1].tolist()]

    py_s, _ = best_of(python_ref, 1)
    anchor = anchor_c_seconds(tokens, a.order)

    big = rows[-1]
    per = big["seconds"] / (big["tokens"] * math.log2(big["tokens"]))
    full_s = per * FULL_TOKENS * math.log2(FULL_TOKENS)
    full_peak = big["peak_bytes"] * FULL_TOKENS / big["tokens"]
    result = {
        "what": "pgolf.evaluate.ngram_tilt.stream_hints (vectorised numpy; the pass evaluate runs) on this CPU",
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)},
        "python": platform.python_version(), "numpy": np.__version__,
        "settings": {"order": a.order, "threshold": a.threshold, "shard": str(a.tokens.name)},
        "streams": rows,
        "prefix_tokens_per_second": rows[0]["tokens_per_second"],
        "python_reference": {"what": "OnlineNgram.step, one token at a time (pure Python)", "tokens": n_py,
                             "seconds": round(py_s, 3), "tokens_per_second": round(n_py / py_s)},
        "anchor_c": anchor,
        "projection": {
            "tokens": FULL_TOKENS, "ranks": RANKS,
            "how": "a * N log2 N through the longest stream; every rank computes the whole stream's hints "
                   "(the state is sequential), concurrently on its own cores: per-rank wall = whole-stream time",
            "seconds_per_rank": round(full_s, 1),
            "fraction_of_eval_budget": round(full_s / EVAL_BUDGET_S, 4),
            "peak_bytes_per_rank": int(full_peak),
            "peak_bytes_all_ranks": int(full_peak * RANKS),
            "python_reference_seconds": round(FULL_TOKENS / (n_py / py_s), 0),
        },
    }
    write_json(a.out, result)
    print(f"projection: {FULL_TOKENS:,} tokens -> {full_s:.1f} s per rank ({100 * full_s / EVAL_BUDGET_S:.1f} % "
          f"of {EVAL_BUDGET_S:.0f} s), peak {full_peak / 2**30:.1f} GiB per rank; pure Python "
          f"{FULL_TOKENS / (n_py / py_s):,.0f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
