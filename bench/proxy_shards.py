"""Challenge-format shards from the proxy corpus, for GPU benchmarks and ablations.

    python -m bench.proxy_shards --corpus DIR_OR_FILE --val DIR --out DIR [--workers N] [--max-tokens N]
    python -m bench.proxy_shards --corpus DIR_OR_FILE --val-docs DOCS.jsonl.zst --out DIR --text-transform caseops \\
        --tokenizer data/tokenizer_src/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model [--shard-tokens N]

Writes `fineweb_train_*.bin` (each document as [BOS] + ids, pgolf.prepare.prepare's encoder and
shard writer) from the proxy corpus (`../shared/data/proxy_corpus`, NOT FineWeb), and either copies
the official validation prefix `fineweb_val_*.bin` from `--val` unchanged, or encodes validation
documents from `--val-docs` (text: the 901 FineWeb validation documents,
`../shared/data/fineweb_val_first901/docs.jsonl.zst`) the same way. With `--text-transform caseops`
(which needs `--val-docs` and a CaseOps `--tokenizer`, e.g. PR #2135's SP8192 model) every document
is CaseOps-encoded first and the validation byte sidecar `fineweb_val_bytes_*.bin` is written
beside the val shards: exactly the folder PR #2135's `prepare_caseops_data.py` writes, so both
`prepare.source: fineweb` with `prepare.corpus: DIR` (and `prepare.text_transform: caseops`,
`prepare.tokenizer: MODEL`, `prepare.vocab_size: 8192`) and the anchor's train_gpt.py
(`CASEOPS_ENABLED=1 DATA_PATH=DIR TOKENIZER_PATH=MODEL VOCAB_SIZE=8192`) take it. The anchor's GPTQ
calibration loaders give rank r the train shards r::world_size, so for its 8-GPU runs keep at
least 8 train shards (`--shard-tokens`). The device machines have no room to carry the 98 MB of
train shards; the 30 MB of compressed text tokenize there in seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import sentencepiece as spm

from pgolf.prepare import caseops
from pgolf.prepare.corpus import iter_documents
from pgolf.prepare.prepare import ShardWriter, encode_split
from pgolf.shared import shards, val_bytes

REPO = Path(__file__).resolve().parents[1]
SP_MODEL = REPO / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"
CASEOPS_MODEL = REPO / "data" / "tokenizer_src" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


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


def build(corpus: Path, val: Path | None, out: Path, workers: int, max_tokens: int = 0, val_docs: Path | None = None,
          tokenizer: Path = SP_MODEL, text_transform: str = "none", shard_tokens: int = 100_000_000) -> dict:
    """Train shards from `corpus`; the val shards of `val` copied, or `val_docs` encoded (with the
    byte sidecar for caseops); -> stats (also out/proxy_shards.json)."""
    if (val is None) == (val_docs is None):
        raise SystemExit("proxy_shards: error: give exactly one of --val (shard folder) and --val-docs (text)")
    if text_transform != "none" and val_docs is None:
        raise SystemExit(f"proxy_shards: error: --text-transform {text_transform} needs --val-docs (validation text)")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    if text_transform == "caseops":
        caseops.check_tokenizer(sp, str(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = {"corpus": str(corpus), "tokenizer": str(tokenizer), "vocab_size": int(sp.vocab_size()),
            "text_transform": text_transform}
    if val_docs is not None:
        sidecar = (ShardWriter(out, "val", shard_tokens, prefix=val_bytes.SIDECAR_PREFIX)
                   if text_transform == "caseops" else None)
        v = encode_split(iter_documents(val_docs), tokenizer, ShardWriter(out, "val", shard_tokens), workers,
                         desc="val", transform=text_transform, sidecar=sidecar)
        info.update(val_docs=v["docs"], val_source=str(val_docs))
        if sidecar is not None:
            info["val_bytes"] = v["sidecar_bytes"]
    else:
        vals = shards.list_shards(val, "val")
        for p in vals:
            shutil.copyfile(p, out / p.name)
    docs = TokenBudget(max_tokens).take(iter_documents(corpus))
    stats = encode_split(docs, tokenizer, ShardWriter(out, "train", shard_tokens), workers, desc="proxy",
                         transform=text_transform)
    vals = shards.list_shards(out, "val")
    info.update({"train_docs": stats["docs"], "train_tokens": stats["tokens"], "train_shards": stats["shards"],
                 "val_shards": [p.name for p in vals], "val_tokens": sum(shards.read_shard_header(p) for p in vals),
                 "val_byte_sidecar": [p.name for p in val_bytes.list_sidecar(out)],
                 "seconds": round(time.perf_counter() - t0, 1)})
    (out / "proxy_shards.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="proxy corpus folder or file (.jsonl.zst)")
    ap.add_argument("--val", type=Path, help="folder holding the official fineweb_val_*.bin (copied)")
    ap.add_argument("--val-docs", type=Path, help="validation documents as text (.jsonl[.zst]; encoded)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=0, help="stop after about this many train tokens (0 = all)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help=f"SentencePiece .model (default: {SP_MODEL.name}; with caseops {CASEOPS_MODEL.name})")
    ap.add_argument("--text-transform", choices=("none", "caseops"), default="none")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (the anchor: 10,000,000)")
    a = ap.parse_args(argv)
    tokenizer = a.tokenizer or (CASEOPS_MODEL if a.text_transform == "caseops" else SP_MODEL)
    val = a.val.resolve() if a.val else None
    val_docs = a.val_docs.resolve() if a.val_docs else None
    print(json.dumps(build(a.corpus.resolve(), val, a.out.resolve(), a.workers, a.max_tokens, val_docs,
                           tokenizer.resolve(), a.text_transform, a.shard_tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
