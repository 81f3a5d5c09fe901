"""The per-token byte tables of val_bpb (recipe-spec §2.1): `data/tokenizer/byte_tables.pgt`.

Built from a SentencePiece model by `pgolf.prepare.tokenizer` (prepare writes them); this module owns the
file (its name, save, load) and the byte counts read from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.shared import tensorfile

BYTE_TABLES_FILE = "byte_tables.pgt"


def byte_tables_path(tokenizer_dir: str | Path) -> Path:
    return Path(tokenizer_dir) / BYTE_TABLES_FILE


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

    def count(self, prev: torch.Tensor, tgt: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Bytes credited to each target: base[tgt] + (space[tgt] and not boundary[prev]); int64.
        (`pos`, the targets' stream positions, is for the byte sidecar's counter, pgolf.shared.val_bytes.)"""
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
    path = byte_tables_path(tokenizer_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: byte tables not found (run the prepare stage first)")
    tensors, header = tensorfile.load(path, kind="byte_tables")
    missing = {"base_bytes", "has_leading_space", "is_boundary"} - set(tensors)
    if missing:
        raise tensorfile.TensorFileError(f"{path}: missing tables {sorted(missing)}")
    return ByteTables(tensors["base_bytes"], tensors["has_leading_space"], tensors["is_boundary"], header["meta"])
