"""Challenge-format shards from the proxy corpus, for GPU benchmarks and ablations.

    python -m bench.proxy_shards --corpus DIR_OR_FILE --val DIR --out DIR [--workers N] [--max-tokens N]

Writes `fineweb_train_*.bin` (each document as [BOS] + sp1024 ids, pgolf.prepare.prepare's encoder and
shard writer) from the proxy corpus (`../shared/data/proxy_corpus`, NOT FineWeb), and copies
the official validation prefix `fineweb_val_*.bin` from `--val` unchanged, so that
`prepare.source: fineweb` with `prepare.corpus: DIR` takes both. The device machines have no
room to carry the 98 MB of train shards; the 30 MB of compressed text tokenize there in seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from pgolf.shared import shards
from pgolf.prepare.corpus import iter_documents
from pgolf.prepare.prepare import ShardWriter, encode_split

REPO = Path(__file__).resolve().parents[1]
SP_MODEL = REPO / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"


class TokenBudget:
    """Documents of `docs` until `max_tokens` (0 = no limit) is reached, counted as text length / 2.3
    (the corpus's bytes per token) so the cut needs no second encoding pass."""

    def __init__(self, max_tokens: int):
        self.max_chars = int(max_tokens * 2.3) if max_tokens > 0 else 0

    def take(self, docs):
        used = 0
        for d in docs:
            used += len(d)
            if self.max_chars and used > self.max_chars:
                return
            yield d


def build(corpus: Path, val: Path, out: Path, workers: int, max_tokens: int = 0) -> dict:
    """Train shards from `corpus`, the val shards of `val` copied; -> stats (also out/proxy_shards.json)."""
    vals = shards.list_shards(val, "val")
    if not vals:
        raise SystemExit(f"proxy_shards: error: {val}: no fineweb_val_*.bin shards")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    docs = TokenBudget(max_tokens).take(iter_documents(corpus))
    stats = encode_split(docs, SP_MODEL, ShardWriter(out, "train", 100_000_000), workers, desc="proxy")
    for p in vals:
        shutil.copyfile(p, out / p.name)
    info = {"corpus": str(corpus), "train_docs": stats["docs"], "train_tokens": stats["tokens"],
            "train_shards": stats["shards"], "val_shards": [p.name for p in vals],
            "val_tokens": sum(shards.read_shard_header(p) for p in vals), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "proxy_shards.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="proxy corpus folder or file (.jsonl.zst)")
    ap.add_argument("--val", type=Path, required=True, help="folder holding the official fineweb_val_*.bin")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=0, help="stop after about this many train tokens (0 = all)")
    a = ap.parse_args(argv)
    print(json.dumps(build(a.corpus.resolve(), a.val.resolve(), a.out.resolve(), a.workers, a.max_tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
