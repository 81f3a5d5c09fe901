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
    """Challenge loader: every rank reads the same stream and keeps its own slice (§1.4)."""

    def __init__(self, paths, rank: int = 0, world_size: int = 1, device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.stream = TokenStream(paths)

    def next_batch(self, local: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (local/seq_len, seq_len) for this rank's next micro-batch of `local`
        tokens (TrainConfig.batch_split's micro_tokens, a multiple of seq_len)."""
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
