"""The prepare stage: corpus -> tokenizer + challenge-format token shards + metrics.

This module owns turning a text corpus (or the challenge's published pre-tokenized export)
into the stage outputs:

* `data/tokenizer/`: `tokenizer.model` (copy or freshly trained), `tokenizer.json`
  {model_file, vocab_size, sha256, source}, `byte_tables.pgt` (recipe-spec §2.1);
* `data/shards/`: `fineweb_val_%06d.bin` and `fineweb_train_%06d.bin` (§1.1/§1.2: one BOS
  before every document, no EOS, raw text encoded, val and train never share a shard), and with
  `text_transform: caseops` the validation byte sidecar `fineweb_val_bytes_%06d.bin`
  (pgolf.shared.val_bytes: each val token's count of original bytes);
* `metrics/prepare.json`.

With `text_transform: caseops` every document goes through pgolf.prepare.caseops.encode before
the tokenizer (which must have the operator pieces), exactly as PR #2135's
`prepare_caseops_data.py`; every validation document is checked to decode back to itself, and
`val_bytes` counts the original text (the sidecar's sum), not the transformed one.

Both folders are built in temp folders and swapped in at the end (`pgolf.shared.io.staged_dir`), so a
failure leaves the previous outputs untouched. For text sources the byte tables are checked
against the decoded validation text (every validation byte must be counted exactly once).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf.shared import byte_tables, layout, shards, tokenizer_meta, val_bytes
from pgolf.prepare import tokenizer
from pgolf.config import PrepareConfig
from pgolf.prepare.corpus import CorpusError, corpus_files, iter_documents
from pgolf.shared.io import staged_dir, write_json
from pgolf.shared.progress import Progress, track

CHUNK_DOCS = 256  # documents per encoding task
MIN_TEXT_TOKENS = 256  # fewer text tokens in a split (BOS not counted) = an empty or near-empty corpus


def _path(root: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else root / q


# ----------------------------------------------------------------------------- shard writing


class ShardWriter:
    """Appends tokens of one split and writes a full shard every `shard_tokens` tokens (files
    `<prefix>%06d.bin`, prefix `fineweb_<split>_`; the byte sidecar's writer takes its own)."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, prefix: str = ""):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.prefix = prefix or f"fineweb_{split}_"
        self.pending: list[np.ndarray] = []
        self.fill = 0
        self.shards = 0
        self.tokens = 0

    def add(self, toks: np.ndarray) -> None:
        pos = 0
        while pos < toks.size:
            k = min(self.shard_tokens - self.fill, toks.size - pos)
            self.pending.append(toks[pos:pos + k])
            self.fill += k
            pos += k
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        path = self.folder / f"{self.prefix}{self.shards:06d}.bin"
        if self.prefix == val_bytes.SIDECAR_PREFIX:
            val_bytes.write_sidecar(path, np.concatenate(self.pending))
        else:
            shards.write_shard(path, np.concatenate(self.pending))
        self.tokens += self.fill
        self.shards += 1
        self.pending, self.fill = [], 0


# ----------------------------------------------------------------------------- encoding

_worker_sp: spm.SentencePieceProcessor | None = None


def _init_worker(model_path: str) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def _original_byte_counts(texts: list[str], encoded: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(ids, original bytes per token) of CaseOps-encoded documents; CaseOpsError if one does not
    decode back to its text or its tokens would credit more bytes than it has."""
    from pgolf.prepare import caseops  # here and below: prepare.text_transform caseops only

    ids, counts = [], []
    for text, enc, m in zip(texts, encoded, _worker_sp.encode(encoded, out_type="offset_mapping")):
        if caseops.decode(enc) != text:
            raise caseops.CaseOpsError(f"a document (starting {text[:40]!r}) does not survive the CaseOps round trip")
        c = caseops.piece_original_bytes(enc, m["offsets"])
        if int(c.sum()) > len(text.encode("utf-8")):
            raise caseops.CaseOpsError(f"a document (starting {text[:40]!r}): its tokens' spans overlap")
        ids.append(np.asarray(m["ids"], dtype=np.int32))
        counts.append(c)
    return ids, counts


def _encode_chunk(task: tuple[list[str], bool, str, bool]):
    """Encode raw documents (no strip), CaseOps-encoded first with transform "caseops" -> (ids,
    decoded text lengths with `want_bytes`, original bytes per token with `want_sidecar`)."""
    texts, want_bytes, transform, want_sidecar = task
    encoded = texts
    if transform == "caseops":
        from pgolf.prepare import caseops

        encoded = [caseops.encode(t) for t in texts]
    if want_sidecar:
        ids, counts = _original_byte_counts(texts, encoded)
    else:
        ids, counts = [np.asarray(d, dtype=np.int32) for d in _worker_sp.encode(encoded)], None
    nbytes = [tokenizer.decoded_bytes(_worker_sp, d) for d in ids] if want_bytes else None
    return ids, nbytes, counts


def _chunks(docs: Iterable[str], *flags) -> Iterator[tuple]:
    it = iter(docs)
    while chunk := list(islice(it, CHUNK_DOCS)):
        yield (chunk, *flags)


def _encoded(docs: Iterable[str], model_path: Path, workers: int, want_bytes: bool, transform: str = "none",
             want_sidecar: bool = False):
    """Encoded chunks in document order; a process pool once there is more than one chunk."""
    chunks = _chunks(docs, want_bytes, transform, want_sidecar)
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    if second is None or workers <= 1:
        _init_worker(str(model_path))
        for task in [first] + ([second] if second else []):
            yield _encode_chunk(task)
        for task in chunks:
            yield _encode_chunk(task)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        def tasks():
            yield first
            yield second
            yield from chunks
        yield from pool.imap(_encode_chunk, tasks())


def encode_split(docs: Iterable[str], model_path: Path, writer: ShardWriter, workers: int,
                 tables: byte_tables.ByteTables | None = None, desc: str = "", transform: str = "none",
                 sidecar: ShardWriter | None = None) -> dict:
    """Encode documents as [BOS] + ids into `writer` (CaseOps-encoded first with transform
    "caseops"); with `tables`, byte-check every document; with `sidecar`, write each token's
    original bytes there (0 for the BOS), parallel to `writer`."""
    n_docs = tab_bytes = txt_bytes = side_bytes = 0
    bar = Progress(f"encode {desc}", unit="doc")
    for ids, nbytes, counts in _encoded(docs, model_path, workers, tables is not None, transform, sidecar is not None):
        if tables is not None:
            t, x = tokenizer.byte_check(ids, nbytes, tables, name=desc, first_index=n_docs)
            tab_bytes += t
            txt_bytes += x
        for i, d in enumerate(ids):
            writer.add(np.concatenate([[tokenizer.BOS_ID], d]).astype(np.uint16))
            if sidecar is not None:
                if counts[i].size and int(counts[i].max()) >= 2**16:
                    raise val_bytes.SidecarError(f"{desc} document {n_docs + i}: a token accounts for "
                                                 f"{int(counts[i].max())} bytes, more than a uint16 sidecar entry holds")
                sidecar.add(np.concatenate([[0], counts[i]]).astype(np.uint16))
                side_bytes += int(counts[i].sum())
        n_docs += len(ids)
        bar.update(len(ids))
    bar.close()
    writer.flush()
    if sidecar is not None:
        sidecar.flush()
    return {"docs": n_docs, "tokens": writer.tokens, "shards": writer.shards,
            "table_bytes": tab_bytes, "text_bytes": txt_bytes, "sidecar_bytes": side_bytes}


# ----------------------------------------------------------------------------- tokenizer output


def _write_tokenizer(tdir: Path, sp: spm.SentencePieceProcessor, cfg: PrepareConfig, source: str) -> tuple[str, byte_tables.ByteTables]:
    model = tdir / layout.TOKENIZER_MODEL_FILE
    if cfg.text_transform == "caseops":
        from pgolf.prepare import caseops

        caseops.check_tokenizer(sp, source)
    sha = tokenizer.file_sha256(model)
    meta = {"model_file": model.name, "vocab_size": int(sp.vocab_size()), "sha256": sha, "source": source}
    if cfg.text_transform != "none":
        meta[tokenizer_meta.TEXT_TRANSFORM] = cfg.text_transform
    tokenizer_meta.write_tokenizer_meta(tdir, meta)
    tables = tokenizer.build_byte_tables(sp, cfg.vocab_size, {"tokenizer_sha256": sha, "vocab_size": cfg.vocab_size})
    tables.save(byte_tables.byte_tables_path(tdir))
    return sha, tables


# ----------------------------------------------------------------------------- text sources


def _doc_sources(cfg: PrepareConfig, root: Path):
    corpus = _path(root, cfg.corpus)
    val_path = None if cfg.val_from_corpus else _path(root, cfg.val_source)

    def val_docs():
        if val_path is not None:
            return iter_documents(val_path)
        return islice(iter_documents(corpus), cfg.val_docs)

    def train_docs():
        it = iter_documents(corpus)
        if val_path is None:
            it = islice(it, cfg.val_docs, None)  # the first val_docs documents are validation
        if cfg.max_train_docs > 0:
            it = islice(it, cfg.max_train_docs)
        return it

    return val_docs, train_docs


def _check_not_near_empty(split: dict, path: Path, what: str) -> None:
    """CorpusError naming `path` when the split's documents hold almost no text (empty files)."""
    text_tokens = split["tokens"] - split["docs"]  # one BOS per document
    if text_tokens < MIN_TEXT_TOKENS:
        raise CorpusError(f"{path}: empty or near-empty corpus: {split['docs']:,} {what} document(s) hold "
                          f"{text_tokens:,} tokens of text (at least {MIN_TEXT_TOKENS} needed)")


def _prepare_text(cfg: PrepareConfig, root: Path, sdir: Path, tdir: Path) -> dict:
    for p in (cfg.corpus, cfg.val_source):  # fail fast on a missing path, before any work
        if not corpus_files(_path(root, p)):
            raise CorpusError(f"{_path(root, p)}: empty corpus (no .jsonl, .jsonl.zst or .txt files)")
    val_docs, train_docs = _doc_sources(cfg, root)
    model = tdir / layout.TOKENIZER_MODEL_FILE
    caps = cfg.text_transform == "caseops"
    if caps:
        from pgolf.prepare import caseops
    if cfg.tokenizer == "train":
        docs = train_docs()
        if cfg.tokenizer_train_docs > 0:
            docs = islice(docs, cfg.tokenizer_train_docs)
        if caps:
            docs = map(caseops.encode, docs)
        tokenizer.train_tokenizer(docs, cfg.vocab_size, model, num_threads=cfg.workers,
                                  user_defined_symbols=caseops.OPERATORS if caps else ())
        n = cfg.tokenizer_train_docs or "all"
        source = f"trained: SentencePiece BPE on {n} {'CaseOps-encoded ' if caps else ''}training docs of {cfg.corpus}"
    else:
        src = _path(root, cfg.tokenizer)
        tokenizer.load_tokenizer(src, cfg.vocab_size)
        shutil.copyfile(src, model)
        source = cfg.tokenizer
    sp = tokenizer.load_tokenizer(model, cfg.vocab_size)
    sha, tables = _write_tokenizer(tdir, sp, cfg, source)

    sidecar = ShardWriter(sdir, "val", cfg.shard_tokens, prefix=val_bytes.SIDECAR_PREFIX) if caps else None
    val = encode_split(val_docs(), model, ShardWriter(sdir, "val", cfg.shard_tokens), cfg.workers,
                       tables=tables, desc="val", transform=cfg.text_transform, sidecar=sidecar)
    if val["docs"] == 0:
        raise CorpusError(f"{cfg.val_source}: no validation documents")
    _check_not_near_empty(val, _path(root, cfg.val_source), "validation")
    train = encode_split(train_docs(), model, ShardWriter(sdir, "train", cfg.shard_tokens), cfg.workers,
                         desc="train", transform=cfg.text_transform)
    if train["docs"] == 0:
        raise CorpusError(f"{cfg.corpus}: no training documents (after taking {cfg.val_docs} for validation)"
                          if cfg.val_from_corpus else f"{cfg.corpus}: no training documents")
    _check_not_near_empty(train, _path(root, cfg.corpus), "training")
    n_bytes = tables.stream_bytes(shards.load_tokens(shards.list_shards(sdir, "val")))
    if n_bytes != val["text_bytes"]:
        raise tokenizer.TokenizerError(f"byte check failed: validation shards hold {n_bytes} bytes, "
                                       f"the decoded validation text {val['text_bytes']}")
    out = {"vocab_size": int(sp.vocab_size()), "train_tokens": train["tokens"], "val_tokens": val["tokens"],
           "val_bytes": n_bytes, "train_docs": train["docs"], "val_docs": val["docs"],
           "tokenizer_sha256": sha, "train_shards": train["shards"], "val_shards": val["shards"],
           "byte_check": "passed"}
    if caps:
        side = int(val_bytes.read_sidecar(sdir).sum())
        if side != val["sidecar_bytes"]:
            raise val_bytes.SidecarError(f"{sdir}: the byte sidecar files sum to {side} bytes, the encoder counted "
                                         f"{val['sidecar_bytes']}")
        out.update(val_bytes=side, val_bytes_transformed=n_bytes)
    return out


# ----------------------------------------------------------------------------- fineweb export


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _prepare_fineweb(cfg: PrepareConfig, root: Path, sdir: Path, tdir: Path) -> dict:
    """Train shards from cfg.corpus, val shards from cfg.val_source (the same folder or another), linked unchanged."""
    folder = _path(root, cfg.corpus)
    if not folder.is_dir():
        raise CorpusError(f"{folder}: challenge shard folder not found (download it with `pgolf fineweb "
                          f"--train-shards {cfg.fineweb_train_shards} --out {cfg.corpus}`)")
    src = _path(root, cfg.tokenizer)
    tokenizer.load_tokenizer(src, cfg.vocab_size)
    shutil.copyfile(src, tdir / layout.TOKENIZER_MODEL_FILE)
    sp = tokenizer.load_tokenizer(tdir / layout.TOKENIZER_MODEL_FILE, cfg.vocab_size)
    sha, tables = _write_tokenizer(tdir, sp, cfg, cfg.tokenizer)

    val_folder = _path(root, cfg.val_source)
    sidecar = val_bytes.list_sidecar(val_folder)
    if cfg.text_transform != "none" and not sidecar:
        raise val_bytes.SidecarError(f"{val_folder}: prepare.text_transform is {cfg.text_transform} but the folder has "
                                     f"no byte sidecar {val_bytes.SIDECAR_PREFIX}*.bin for its validation shards")
    for p in sidecar:
        _link_or_copy(p, sdir / p.name)
    stats = {}
    for split in ("val", "train"):
        n_tok = n_docs = 0
        paths = shards.list_shards(val_folder if split == "val" else folder, split)
        for p in track(paths, desc=f"check {split} shards", unit="shard"):
            toks = shards.read_shard(p)
            if toks.size and int(toks.max()) >= cfg.vocab_size:
                raise shards.ShardError(f"{p}: token id {int(toks.max())} >= prepare.vocab_size {cfg.vocab_size}")
            n_tok += toks.size
            n_docs += int(np.count_nonzero(toks == tokenizer.BOS_ID))
            _link_or_copy(p, sdir / p.name)
        stats[split] = (n_tok, n_docs, len(paths))
    val_tokens = shards.load_tokens(shards.list_shards(sdir, "val"))
    if sidecar:
        n_bytes = int(val_bytes.byte_counter(sdir, tables, val_tokens).counts.sum())  # checked parallel to the shards
    else:
        n_bytes = tables.stream_bytes(val_tokens)
    return {"vocab_size": int(sp.vocab_size()), "train_tokens": stats["train"][0], "val_tokens": stats["val"][0],
            "val_bytes": n_bytes, "train_docs": stats["train"][1], "val_docs": stats["val"][1],
            "tokenizer_sha256": sha, "train_shards": stats["train"][2], "val_shards": stats["val"][2],
            "byte_check": "not applicable (pre-tokenized export)"}


# ----------------------------------------------------------------------------- entry


def run(cfg: PrepareConfig, root: str | Path = ".") -> dict:
    """Build data/tokenizer, data/shards and metrics/prepare.json under `root`; returns the metrics."""
    root = Path(root)
    t0 = time.perf_counter()
    build = _prepare_fineweb if cfg.source == "fineweb" else _prepare_text
    with staged_dir(root / layout.SHARDS) as sdir, staged_dir(root / layout.TOKENIZER) as tdir:
        metrics = build(cfg, root, sdir, tdir)
    metrics["bytes_per_token"] = round(metrics["val_bytes"] / max(metrics["val_tokens"], 1), 6)
    metrics["source"] = cfg.source
    metrics["text_transform"] = cfg.text_transform
    metrics["byte_source"] = "sidecar" if val_bytes.list_sidecar(root / layout.SHARDS) else "tables"
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(root / layout.PREPARE_METRICS, metrics)
    return metrics
