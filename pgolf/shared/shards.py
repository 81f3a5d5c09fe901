"""Token shards: the on-disk token format, exactly the challenge's (recipe-spec §1.1).

This module owns the shard files under `data/shards/` (`fineweb_{train,val}_*.bin`): writing,
reading and validating them, listing a split. The training loader that streams them
(pgolf.train.loader) and the byte tables that turn a loss into bits per byte (pgolf.shared.byte_tables) live
apart, so evaluation code does not carry training code.

Shard layout: 256 little-endian int32 header words [MAGIC, VERSION, N, 0, ...] followed by N
little-endian uint16 token ids; the file is exactly 1024 + 2N bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pgolf.config import MAX_SHARD_TOKENS
from pgolf.shared.io import atomic_write_bytes

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
BOS_ID = 1  # every document of a shard starts with this token (pgolf.prepare.tokenizer trains it in)


class ShardError(ValueError):
    """A token shard (or shard folder) that is missing, malformed or not in the challenge format."""


def encode_shard(tokens) -> bytes:
    """The exact bytes of a challenge shard holding `tokens` (ids must fit in uint16)."""
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise ShardError(f"tokens must be 1-D, got shape {toks.shape}")
    if toks.size > MAX_SHARD_TOKENS:
        raise ShardError(f"{toks.size} tokens do not fit in one shard (limit {MAX_SHARD_TOKENS})")
    if toks.dtype != np.uint16 and toks.size:
        if not np.issubdtype(toks.dtype, np.integer):
            raise ShardError(f"tokens must be integers, got dtype {toks.dtype}")
        lo, hi = int(toks.min()), int(toks.max())
        if lo < 0 or hi >= 2**16:
            raise ShardError(f"token id {hi if hi >= 2**16 else lo} does not fit in uint16 (vocab must be <= 65536)")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, toks.size
    return header.tobytes() + toks.astype("<u2", copy=False).tobytes()


def write_shard(path: str | Path, tokens) -> int:
    """Write `tokens` as a challenge shard atomically; returns the token count."""
    blob = encode_shard(tokens)
    atomic_write_bytes(path, blob)
    return (len(blob) - HEADER_BYTES) // 2


def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header and size; returns its token count N."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated header ({size} bytes, need {HEADER_BYTES})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if int(header[0]) != MAGIC:
        raise ShardError(f"{path}: wrong magic {int(header[0])} (expected {MAGIC}); not a token shard")
    if int(header[1]) != VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise ShardError(
            f"{path}: size mismatch: header says {n} tokens ({HEADER_BYTES + 2 * n} bytes) but the file has {size} bytes"
        )
    return n


def read_shard(path: str | Path) -> np.ndarray:
    """Read and validate one shard; returns its tokens as uint16[N]."""
    n = read_shard_header(path)
    toks = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)
    if toks.size != n:
        raise ShardError(f"{path}: short read ({toks.size} of {n} tokens)")
    return toks.astype(np.uint16, copy=False)


def max_token_id(path: str | Path) -> int:
    """The largest token id in a shard (-1 if it is empty), read through a memory map: a cheap
    check of a whole shard before training starts."""
    n = read_shard_header(path)
    if n == 0:
        return -1
    return int(np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,)).max())


def list_shards(folder: str | Path, split: str) -> list[Path]:
    """Sorted `fineweb_{split}_<digits>.bin` files of a folder; ShardError if there are none. (The
    validation byte sidecar `fineweb_val_bytes_*.bin` of pgolf.shared.val_bytes is not a shard.)"""
    if split not in ("train", "val"):
        raise ShardError(f"split must be 'train' or 'val', got {split!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: shard folder not found")
    paths = sorted(p for p in folder.glob(f"fineweb_{split}_*.bin") if re.fullmatch(rf"fineweb_{split}_\d+\.bin", p.name))
    if not paths:
        raise ShardError(f"{folder}: no fineweb_{split}_*.bin shards")
    return paths


def load_tokens(paths) -> np.ndarray:
    """All tokens of `paths`, concatenated in the given order (uint16)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ShardError("load_tokens: no shard paths given")
    return np.concatenate([read_shard(p) for p in paths])
