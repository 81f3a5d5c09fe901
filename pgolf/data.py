"""Token shards, the training token loader and the val_bpb byte tables.

This module owns the on-disk token format (exactly the challenge's, recipe-spec §1.1), the
streaming loader that feeds training (§1.4, challenge semantics so a run sees the same tokens
as the record scripts), and the per-token byte lookup tables used to turn a loss into bits per
byte (§2.1). The tables are built from a SentencePiece model in `pgolf.tokenizer` and stored in
`data/tokenizer/byte_tables.pgt`; everything here only reads them.

Shard layout: 256 little-endian int32 header words [MAGIC, VERSION, N, 0, ...] followed by N
little-endian uint16 token ids; the file is exactly 1024 + 2N bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pgolf import tensorfile
from pgolf.io import atomic_write_bytes

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MAX_TOKENS_PER_SHARD = 2**31 - 1
BYTE_TABLES_FILE = "byte_tables.pgt"
TOKENIZER_META_FILE = "tokenizer.json"
BOS_ID = 1  # every document of a shard starts with this token (pgolf.tokenizer trains it in)


class ShardError(ValueError):
    """A token shard (or shard folder) that is missing, malformed or not in the challenge format."""


# ----------------------------------------------------------------------------- shards


def encode_shard(tokens) -> bytes:
    """The exact bytes of a challenge shard holding `tokens` (ids must fit in uint16)."""
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise ShardError(f"tokens must be 1-D, got shape {toks.shape}")
    if toks.size > MAX_TOKENS_PER_SHARD:
        raise ShardError(f"{toks.size} tokens do not fit in one shard (limit {MAX_TOKENS_PER_SHARD})")
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
    """Sorted `fineweb_{split}_*.bin` files of a folder; ShardError if there are none."""
    if split not in ("train", "val"):
        raise ShardError(f"split must be 'train' or 'val', got {split!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: shard folder not found")
    paths = sorted(folder.glob(f"fineweb_{split}_*.bin"))
    if not paths:
        raise ShardError(f"{folder}: no fineweb_{split}_*.bin shards")
    return paths


def load_tokens(paths) -> np.ndarray:
    """All tokens of `paths`, concatenated in the given order (uint16)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ShardError("load_tokens: no shard paths given")
    return np.concatenate([read_shard(p) for p in paths])


# ----------------------------------------------------------------------------- loader


class TokenStream:
    """Contiguous tokens from a sorted shard list, one shard in memory, wrapping around (§1.4)."""

    def __init__(self, paths):
        self.paths = sorted(Path(p) for p in paths)
        if not self.paths:
            raise ShardError("TokenStream: no shards given")
        self.file_idx = 0
        self.pos = 0
        self.tokens = read_shard(self.paths[0])

    def _advance_file(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.paths)
        self.tokens = read_shard(self.paths[self.file_idx])
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        """The next n tokens (uint16[n]), moving across shard boundaries as needed."""
        chunks, remaining, empty_skips = [], n, 0
        while remaining > 0:
            avail = self.tokens.size - self.pos
            if avail <= 0:
                empty_skips += 1
                if empty_skips > len(self.paths):
                    raise ShardError("TokenStream: every shard is empty")
                self._advance_file()
                continue
            k = min(remaining, avail)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            remaining -= k
            empty_skips = 0
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint16)

    def state_dict(self) -> dict:
        return {"files": [p.name for p in self.paths], "file_idx": self.file_idx, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        names = [p.name for p in self.paths]
        if state.get("files") != names:
            raise ShardError(f"TokenStream state was saved for shards {state.get('files')}, these are {names}")
        self.file_idx = int(state["file_idx"])
        self.tokens = read_shard(self.paths[self.file_idx])
        self.pos = int(state["pos"])
        if not 0 <= self.pos <= self.tokens.size:
            raise ShardError(f"TokenStream state: position {self.pos} outside {self.paths[self.file_idx]}")


class DistributedTokenLoader:
    """Challenge loader: every rank reads the same stream and keeps its own slice (§1.4)."""

    def __init__(self, paths, rank: int = 0, world_size: int = 1, device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.stream = TokenStream(paths)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (local/seq_len, seq_len) for this rank's next micro-batch."""
        denom = self.world_size * grad_accum_steps
        if global_tokens % denom:
            raise ValueError(f"batch tokens {global_tokens} not divisible by world_size*grad_accum_steps = {denom}")
        local = global_tokens // denom
        if local % seq_len:
            raise ValueError(f"local batch {local} tokens not divisible by seq_len {seq_len}")
        span = local + 1
        chunk = self.stream.take(span * self.world_size)  # (world*(local+1),)
        mine = torch.from_numpy(chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64))  # (local+1,)
        if self.device.type == "cuda":  # one asynchronous copy from pinned memory: no host stall
            mine = mine.pin_memory().to(self.device, non_blocking=True)
        x = mine[:-1].reshape(-1, seq_len)  # (B, T)
        y = mine[1:].reshape(-1, seq_len)  # (B, T)
        return x, y

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError(f"loader state saved with world_size {state['world_size']}, now {self.world_size}")
        self.stream.load_state_dict(state["stream"])


# ----------------------------------------------------------------------------- byte tables


class ByteTables:
    """Per-token byte counts for val_bpb (§2.1): base bytes, leading-space flag, boundary flag."""

    def __init__(self, base_bytes: torch.Tensor, has_leading_space: torch.Tensor, is_boundary: torch.Tensor,
                 meta: dict | None = None):
        n = base_bytes.numel()
        if has_leading_space.numel() != n or is_boundary.numel() != n:
            raise ValueError("byte tables must all have the same length")
        self.base_bytes = base_bytes.to(torch.int16)
        self.has_leading_space = has_leading_space.to(torch.bool)
        self.is_boundary = is_boundary.to(torch.bool)
        self.meta = dict(meta or {})

    @property
    def vocab_size(self) -> int:
        return self.base_bytes.numel()

    def to(self, device) -> "ByteTables":
        return ByteTables(self.base_bytes.to(device), self.has_leading_space.to(device),
                          self.is_boundary.to(device), self.meta)

    def count(self, prev: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Bytes credited to each target: base[tgt] + (space[tgt] and not boundary[prev]); int64."""
        base = self.base_bytes[tgt].to(torch.int64)
        space = self.has_leading_space[tgt] & ~self.is_boundary[prev]
        return base + space.to(torch.int64)

    def stream_bytes(self, tokens: np.ndarray) -> int:
        """Bytes of a BOS-led token stream: every target tokens[1:] with its prev tokens[:-1]."""
        if len(tokens) < 2:
            return 0
        toks = np.asarray(tokens, dtype=np.int64)
        tgt, prev = toks[1:], toks[:-1]
        base = self.base_bytes.cpu().numpy().astype(np.int64)[tgt]
        space = self.has_leading_space.cpu().numpy()[tgt] & ~self.is_boundary.cpu().numpy()[prev]
        return int(base.sum() + space.sum())

    def save(self, path: str | Path) -> int:
        tensors = {"base_bytes": self.base_bytes, "has_leading_space": self.has_leading_space,
                   "is_boundary": self.is_boundary}
        return tensorfile.save(path, tensors, kind="byte_tables", meta=self.meta)


def load_byte_tables(tokenizer_dir: str | Path) -> ByteTables:
    """Read `<tokenizer_dir>/byte_tables.pgt` written by prepare."""
    path = Path(tokenizer_dir) / BYTE_TABLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: byte tables not found (run the prepare stage first)")
    tensors, header = tensorfile.load(path, kind="byte_tables")
    missing = {"base_bytes", "has_leading_space", "is_boundary"} - set(tensors)
    if missing:
        raise tensorfile.TensorFileError(f"{path}: missing tables {sorted(missing)}")
    return ByteTables(tensors["base_bytes"], tensors["has_leading_space"], tensors["is_boundary"], header["meta"])


def read_tokenizer_meta(tokenizer_dir: str | Path) -> dict:
    """The tokenizer.json written by prepare: model_file, vocab_size, sha256, source."""
    path = Path(tokenizer_dir) / TOKENIZER_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer metadata not found (run the prepare stage first)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    for key in ("model_file", "vocab_size", "sha256"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta
