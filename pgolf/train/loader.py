"""The training token loader (recipe-spec §1.4): challenge semantics, so a run sees the same
tokens as the record scripts. Training code only: it is not part of what evaluation ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.shared.shards import ShardError, read_shard


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
    """Challenge loader: every rank reads the same stream and keeps its own slice (§1.4), as rows
    of seq_len (`next_batch`) or, with train.doc_packing, as one packed row (`next_packed`)."""

    def __init__(self, paths, rank: int = 0, world_size: int = 1, device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.stream = TokenStream(paths)

    def _span(self, local: int) -> np.ndarray:
        """This rank's `local` + 1 tokens (uint16) of the next world * (local + 1) of the stream."""
        span = local + 1
        chunk = self.stream.take(span * self.world_size)  # (world*(local+1),)
        return chunk[self.rank * span:(self.rank + 1) * span]  # (local+1,)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # one asynchronous copy from pinned memory: no host stall
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def next_batch(self, local: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (local/seq_len, seq_len) for this rank's next micro-batch of `local`
        tokens (TrainConfig.batch_split's micro_tokens, a multiple of seq_len)."""
        mine = self._to_device(torch.from_numpy(self._span(local).astype(np.int64)))  # (local+1,)
        x = mine[:-1].reshape(-1, seq_len)  # (B, T)
        y = mine[1:].reshape(-1, seq_len)  # (B, T)
        return x, y

    def next_packed(self, local: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """train.doc_packing: the same tokens as `next_batch` as ONE row, x and y (1, local) int64,
        and the row's segment boundaries cu_seqlens (S,) int32, built on the host from x's BOS
        positions with segments of at most `max_len` tokens (pgolf.shared.docattn.build_cu_seqlens)."""
        from pgolf.shared.docattn import build_cu_seqlens, doc_starts  # train.doc_packing only

        span = self._span(local)
        cu = torch.from_numpy(build_cu_seqlens(doc_starts(span[:-1]), local, max_len))  # (S,)
        mine = self._to_device(torch.from_numpy(span.astype(np.int64)))  # (local+1,)
        return mine[None, :-1], mine[None, 1:], self._to_device(cu)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError(f"loader state saved with world_size {state['world_size']}, now {self.world_size}")
        self.stream.load_state_dict(state["stream"])
