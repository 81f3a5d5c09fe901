"""The validation byte sidecar: each validation token's count of ORIGINAL UTF-8 bytes.

This module owns the sidecar files `data/shards/fineweb_val_bytes_%06d.bin` (their names, writing,
reading, the checks that tie them to the validation shards) and the byte counter every val_bpb
of pgolf takes its bytes from (train's float evaluation, evaluate's sliding and non-sliding
passes, TTT: all through pgolf.shared.bpb):

* with a sidecar, token i of the validation stream is credited `sidecar[i]` bytes (`SidecarBytes`);
* without one, the §2.1 byte tables of the tokenizer (pgolf.shared.byte_tables) count them, as
  the challenge does.

prepare writes a sidecar when the text was transformed before tokenization
(`prepare.text_transform: caseops`): then the tokens stand for transformed text, and the tables
would count the bytes of the operators and of the normalized transformed text, not those of the
documents. The entries are exactly what PR #2135's `prepare_caseops_data.py` writes: 0 for the
BOS, and for every other token the UTF-8 bytes of the original text its SentencePiece span
covers (pgolf.prepare.caseops.piece_original_bytes; an operator 0). A `none` run writes no
sidecar: a `fineweb_val_bytes_*.bin` beside the shards would be read as validation tokens by the
challenge's own scripts (they glob `fineweb_val_*.bin`), and its entries would be the tables'
counts anyway (`table_token_bytes`).

Format: a token shard's (pgolf.shared.shards: 256 little-endian int32 header [20240520, 1, N, 0...],
then N little-endian uint16), sidecar file k parallel to `fineweb_val_%06d.bin` number k, with as
many entries as that shard has tokens. The PR #2135 training script reads these files unchanged
(`CASEOPS_ENABLED=1`, `load_validation_byte_sidecar`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from pgolf.shared import shards
from pgolf.shared.byte_tables import ByteTables

SIDECAR_PREFIX = "fineweb_val_bytes_"
_SIDECAR_RE = re.compile(r"fineweb_val_bytes_(\d+)\.bin")


class SidecarError(ValueError):
    """A byte sidecar that is missing where it is needed, malformed, or not parallel to the val shards."""


def sidecar_name(index: int) -> str:
    """fineweb_val_bytes_%06d.bin, the sidecar of `fineweb_val_%06d.bin` number `index`."""
    return f"{SIDECAR_PREFIX}{index:06d}.bin"


def list_sidecar(folder: str | Path) -> list[Path]:
    """Sorted sidecar files of a shard folder (empty when it has none)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"{SIDECAR_PREFIX}*.bin") if _SIDECAR_RE.fullmatch(p.name))


def write_sidecar(path: str | Path, counts) -> int:
    """One sidecar file (shard format, uint16 entries); returns the entry count."""
    counts = np.asarray(counts)
    if counts.size and int(counts.max()) >= 2**16:
        raise SidecarError(f"{path}: a token accounts for {int(counts.max())} bytes, more than a uint16 entry holds")
    return shards.write_shard(path, counts)


def read_sidecar(folder: str | Path) -> np.ndarray:
    """All sidecar entries of `folder`, checked file by file against the validation shards:
    as many files as `fineweb_val_*.bin`, each with its shard's token count; int64[N]."""
    folder = Path(folder)
    files, vals = list_sidecar(folder), shards.list_shards(folder, "val")
    if len(files) != len(vals):
        raise SidecarError(f"{folder}: {len(files)} byte sidecar file(s) {SIDECAR_PREFIX}*.bin for "
                           f"{len(vals)} validation shard(s)")
    parts = []
    for f, v in zip(files, vals):
        try:
            counts = shards.read_shard(f)
        except shards.ShardError as e:
            raise SidecarError(f"byte sidecar: {e}") from None
        n = shards.read_shard_header(v)
        if counts.size != n:
            raise SidecarError(f"{f}: byte sidecar has {counts.size:,} entries but {v.name} has {n:,} tokens")
        parts.append(counts.astype(np.int64))
    return np.concatenate(parts)


def table_token_bytes(tokens: np.ndarray, tables: ByteTables) -> np.ndarray:
    """int64[N]: what the §2.1 tables credit each token of a BOS-led stream (token 0 gets 0): the
    sidecar a `none` run would have."""
    toks = np.asarray(tokens, dtype=np.int64)
    out = np.zeros(toks.size, dtype=np.int64)
    if toks.size > 1:
        out[1:] = tables.count(torch.from_numpy(toks[:-1]), torch.from_numpy(toks[1:])).numpy()
    return out


class SidecarBytes:
    """The byte counter of a sidecar: the target at stream index i is credited counts[i].

    Duck-types ByteTables where pgolf.shared.bpb uses it (`vocab_size`, `to`, `count`): the
    tables stay inside for their vocabulary size."""

    source = "sidecar"

    def __init__(self, counts: torch.Tensor, tables: ByteTables):
        self.counts = counts.to(torch.int32)  # (N,) for the whole validation stream
        self.tables = tables

    @property
    def vocab_size(self) -> int:
        return self.tables.vocab_size

    def to(self, device) -> "SidecarBytes":
        return SidecarBytes(self.counts.to(device), self.tables.to(device))

    def count(self, prev: torch.Tensor, tgt: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Bytes of the targets at stream positions `pos` (int64)."""
        if pos is None:
            raise ValueError("a byte sidecar counts by stream position: pass pos")
        return self.counts[pos].to(torch.int64)


def byte_source(counter) -> str:
    """'sidecar' (original bytes from the sidecar) or 'tables' (the §2.1 byte tables)."""
    return "sidecar" if isinstance(counter, SidecarBytes) else "tables"


def byte_counter(shard_dir: str | Path, tables: ByteTables, tokens: np.ndarray, text_transform: str = "none"):
    """The byte counter for `tokens` (a prefix of the validation stream of `shard_dir`): the
    sidecar's when the folder has one, else `tables`. A sidecar is required when the data's
    tokenizer.json names a text transform (its tokens stand for transformed text), and must be
    parallel to the validation shards with 0 at every BOS."""
    shard_dir = Path(shard_dir)
    if not list_sidecar(shard_dir):
        if text_transform != "none":
            raise SidecarError(f"{shard_dir}: no byte sidecar {SIDECAR_PREFIX}*.bin, but the data was prepared with "
                               f"text_transform {text_transform} (data/tokenizer/tokenizer.json); val_bpb needs the "
                               f"original bytes: re-run prepare")
        return tables
    counts = read_sidecar(shard_dir)
    tokens = np.asarray(tokens)
    if counts.size < tokens.size:
        raise SidecarError(f"{shard_dir}: byte sidecar has {counts.size:,} entries for {tokens.size:,} "
                           f"validation tokens")
    bos = np.flatnonzero(tokens == shards.BOS_ID)
    if bos.size and counts[bos].any():
        i = int(bos[np.flatnonzero(counts[bos])[0]])
        raise SidecarError(f"{shard_dir}: byte sidecar credits {int(counts[i])} bytes to the BOS at validation token "
                           f"{i:,} (must be 0): it is not parallel to the fineweb_val_*.bin shards")
    return SidecarBytes(torch.from_numpy(counts[:tokens.size]), tables)
