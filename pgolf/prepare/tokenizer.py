"""SentencePiece tokenizers: load and check a .model, train one, build the val_bpb byte tables.

This module owns everything that touches SentencePiece: loading a `.model` file with the
checks the record scripts make (recipe-spec §1.3: a `.model` whose vocab_size() equals the
configured vocabulary, at most 65,536 so ids fit the uint16 shards), training a BPE with the
challenge's exact trainer settings, the byte lookup tables of §2.1, and the byte check that
ties them to the tokenizer's normalized text.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from pgolf.shared.byte_tables import ByteTables

from pgolf.config import MAX_VOCAB
from pgolf.shared.shards import BOS_ID
from pgolf.shared.io import atomic_write_bytes, file_sha256  # noqa: F401 - file_sha256 is part of this API

SPACE = "\u2581"  # SentencePiece's "▁"
PAD_ID, EOS_ID, UNK_ID = 0, 2, 3  # BOS_ID = 1 comes from pgolf.shared.shards (the shard format)

# spec §1.3: the challenge's trainer arguments (data/download_hf_docs_and_tokenize.py)
TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    hard_vocab_limit=False,
)


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable, or does not match the configuration."""


def check_vocab_size(actual: int, expected: int, source: str) -> None:
    """Raise unless the model's vocab equals the configured one and fits uint16 shards."""
    if actual > MAX_VOCAB:
        raise TokenizerError(f"{source}: vocab_size {actual} > {MAX_VOCAB} does not fit uint16 shards "
                             f"(prepare.vocab_size = {expected})")
    if actual != expected:
        raise TokenizerError(f"{source}: tokenizer vocab_size {actual} != prepare.vocab_size {expected}")


def load_tokenizer(path: str | Path, vocab_size: int) -> spm.SentencePieceProcessor:
    """Load a SentencePiece `.model` and check its vocab size against `vocab_size`."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    if path.suffix != ".model":
        raise TokenizerError(f"{path}: not a SentencePiece .model file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{path}: cannot load SentencePiece model: {e}") from None
    check_vocab_size(int(sp.vocab_size()), vocab_size, str(path))
    return sp


def training_sentences(docs: Iterable[str]) -> Iterator[str]:
    """Tokenizer training text (spec §1.2): NULs to spaces, stripped, empty docs skipped."""
    for doc in docs:
        text = doc.replace("\x00", " ").strip()
        if text:
            yield text


def train_tokenizer(docs: Iterable[str], vocab_size: int, out_path: str | Path, num_threads: int = 2,
                    user_defined_symbols: tuple[str, ...] = ()) -> Path:
    """Train a BPE with the challenge settings on `docs`; writes the .model atomically.
    `user_defined_symbols` become pieces of their own right after the control ids (the CaseOps
    operators: ids 4-7, as in PR #2135's model)."""
    sentences = training_sentences(docs)
    first = next(sentences, None)
    if first is None:
        raise TokenizerError("cannot train a tokenizer: no non-empty training documents")

    def all_sentences():
        yield first
        yield from sentences

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=all_sentences(), model_writer=model,
                                       vocab_size=vocab_size, num_threads=num_threads,
                                       minloglevel=2, **TRAINER_SETTINGS,
                                       **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}))
    except RuntimeError as e:
        raise TokenizerError(f"SentencePiece training failed (vocab_size {vocab_size}): {e}") from None
    out_path = Path(out_path)
    atomic_write_bytes(out_path, model.getvalue())
    return out_path


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int, meta: dict | None = None) -> ByteTables:
    """The §2.1 lookup tables over max(sp.vocab_size(), vocab_size) ids."""
    n = max(int(sp.vocab_size()), vocab_size)
    base = np.zeros(n, dtype=np.int16)
    space = np.zeros(n, dtype=bool)
    boundary = np.ones(n, dtype=bool)
    for t in range(int(sp.vocab_size())):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        boundary[t] = False
        if sp.is_byte(t):
            base[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith(SPACE):
            space[t] = True
            piece = piece[1:]
        base[t] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary), meta)


def decoded_bytes(sp: spm.SentencePieceProcessor, ids) -> int:
    """UTF-8 length of the normalized text that `ids` (no BOS) decode to."""
    return len(sp.decode([int(t) for t in ids]).encode("utf-8"))


def table_bytes_per_doc(docs_ids: list, tables: ByteTables) -> np.ndarray:
    """Bytes the §2.1 tables credit to each document, each read as [BOS] + ids; int64[D]."""
    n = len(docs_ids)
    lens = np.array([len(d) for d in docs_ids], dtype=np.int64)
    if n == 0 or lens.sum() == 0:
        return np.zeros(n, dtype=np.int64)
    base = tables.base_bytes.numpy().astype(np.int64)
    space = tables.has_leading_space.numpy()
    boundary = tables.is_boundary.numpy()
    tgt = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs_ids])  # (sum lens,)
    prev = np.concatenate([np.concatenate([[BOS_ID], np.asarray(d, dtype=np.int64)[:-1]])
                           for d in docs_ids if len(d)])  # (sum lens,)
    per_token = base[tgt] + (space[tgt] & ~boundary[prev])
    doc_of = np.repeat(np.arange(n), lens)
    return np.bincount(doc_of, weights=per_token, minlength=n).astype(np.int64)


def byte_check(docs_ids: list, text_bytes: list, tables: ByteTables, name: str = "validation",
               first_index: int = 0) -> tuple[int, int]:
    """Check that the byte tables credit exactly the UTF-8 bytes of the normalized text.

    docs_ids[i] are document i's token ids WITHOUT its BOS; text_bytes[i] is the UTF-8 length of
    sp.decode(docs_ids[i]). Each document is scored as [BOS] + ids, so its first token gets no
    space byte (§2.1). Returns (table_bytes, text_bytes); raises TokenizerError on any mismatch.
    """
    tab = table_bytes_per_doc(docs_ids, tables)
    txt = np.asarray(text_bytes, dtype=np.int64)
    if tab.shape != txt.shape:
        raise ValueError(f"byte_check: {tab.size} documents of ids but {txt.size} text lengths")
    bad = np.nonzero(tab != txt)[0]
    if bad.size:
        i = int(bad[0])
        raise TokenizerError(f"byte check failed on {name} document {first_index + i}: the byte tables give "
                             f"{int(tab[i])} bytes, its decoded (normalized) text has {int(txt[i])}")
    return int(tab.sum()), int(txt.sum())
