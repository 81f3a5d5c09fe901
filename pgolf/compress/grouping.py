"""Grouped serialisation of the integer codes (compress.layout "grouped"): rows of the same role
side by side, ordered so that similar rows are neighbours, undone at load.

The flat layout (pgolf.compress.artifact) stores each int8 code matrix on its own, in file order. The
grouped one puts every code matrix of one role and width (e.g. `blocks.*.mlp.fc.weight.q`, all
layers) into one (R, C) uint8 block and orders its rows by their projection on the block's first
principal direction (a cheap 1-D ordering: rows with similar projections tend to be similar; the
records' L1 nearest-neighbour sort, PR #1855, is O(R^2 C)). The permutation is stored beside the
block (int32, R values; int16 holding uint16 bits when R <= 65536 with `compact`, compress.layout pergroup) and undone at load, so the decoded codes are bit-identical.

Stored names: `.group.<k>` (R, C) uint8 rows in sorted order and `.perm.<k>` (R,) int32 (sorted
row i is original row perm[i]); a member's layout entry is {"enc": "group", "group": k, "row0": r}
(its rows are original rows [r, r + rows) of the block). With compress.transpose_groups the block is
stored as its (C, R) transpose, column after column of the sorted rows, as PR #2135 stores each
sorted tensor, so that similar codes sit side by side; the entry then holds "transposed": true.

compress.row_order "l1" instead orders each member's rows on their own by a greedy L1 nearest-neighbour
walk (from its first row, always to the closest row not yet taken; exact integer distances, ties to
the lower index), as PR #2135's per-group serialisation does per tensor: O(rows^2 C) per member, so
members of more than L1_MAX_ROWS rows keep the principal-direction order.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from pgolf.config import CompressConfig

GROUP = ".group."
L1_MAX_ROWS = 4096  # larger members fall back to row_order (the distance matrix is rows^2)
PERM = ".perm."


def role(name: str) -> str:
    """`blocks.3.mlp.fc.weight.q` -> `blocks.*.mlp.fc.weight.q` (the layer index dropped)."""
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", name)


def row_order(block: np.ndarray, iters: int = 8) -> np.ndarray:
    """(R, C) uint8 -> (R,) int64 permutation: argsort of the rows' projection on the first
    principal direction (power iteration from a fixed start, float64; stable sort)."""
    x = block.astype(np.float64)
    x -= x.mean(axis=0, keepdims=True)  # (R, C)
    v = np.ones(x.shape[1]) / np.sqrt(x.shape[1])  # (C,)
    for _ in range(iters):
        w = x.T @ (x @ v)  # (C,)
        n = np.linalg.norm(w)
        if n == 0:
            break
        v = w / n
    return np.argsort(x @ v, kind="stable")


def l1_order(rows: np.ndarray) -> np.ndarray:
    """(R, C) uint8 -> (R,) int64 permutation: greedy L1 nearest-neighbour walk from row 0 (row_order
    past L1_MAX_ROWS rows). Distances are sums of small integers in float32, so exact and deterministic."""
    n = len(rows)
    if n > L1_MAX_ROWS:
        return row_order(rows)
    if n <= 2:
        return np.arange(n)
    x = torch.from_numpy(rows.astype(np.float32))
    d = torch.cdist(x, x, p=1).numpy()  # (R, R)
    d[:, 0] = np.inf
    out, cur = np.zeros(n, dtype=np.int64), 0
    for i in range(1, n):
        cur = int(np.argmin(d[cur]))
        out[i] = cur
        d[:, cur] = np.inf
    return out


def group(codes: dict[str, torch.Tensor], cfg: CompressConfig) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """2-D uint8 code tensors (file order) -> (stored blocks + permutations, name -> layout fields), as
    compress.layout ("pergroup": compact permutations), row_order and transpose_groups say."""
    compact, order = cfg.layout == "pergroup", cfg.row_order
    members: dict[tuple[str, int], list[str]] = {}
    for name, t in codes.items():
        if t.dim() == 2 and t.shape[0] > 0:
            members.setdefault((role(name), t.shape[1]), []).append(name)
    stored, entries = {}, {}
    for k, names in enumerate(members.values()):
        block = np.concatenate([codes[n].numpy() for n in names])  # (R, C)
        if order == "l1":  # each member on its own (compress.row_order l1)
            spans = np.cumsum([0] + [codes[n].shape[0] for n in names])
            perm = np.concatenate([a + l1_order(block[a:b]) for a, b in zip(spans, spans[1:])])
        else:
            perm = row_order(block)  # (R,)
        rows = block[perm]  # (R, C)
        stored[f"{GROUP}{k}"] = torch.from_numpy(np.ascontiguousarray(rows.T if cfg.transpose_groups else rows))
        small = compact and len(perm) <= 1 << 16
        stored[f"{PERM}{k}"] = torch.from_numpy(perm.astype(np.uint16).view(np.int16) if small else perm.astype(np.int32))
        r0 = 0
        for n in names:
            entries[n] = {"enc": "group", "group": k, "row0": r0, **({"transposed": True} if cfg.transpose_groups else {})}
            r0 += codes[n].shape[0]
    return stored, entries


def ungroup(stored: dict[str, torch.Tensor], entry: dict, shape: list[int]) -> torch.Tensor:
    """The uint8 (rows, C) of one member: KeyError / ValueError when the tables do not fit."""
    block = stored[f"{GROUP}{entry['group']}"].numpy()
    block = block.T if entry.get("transposed") else block  # (R, C)
    perm = stored[f"{PERM}{entry['group']}"].numpy()
    perm = (perm.view(np.uint16) if perm.dtype == np.int16 else perm).astype(np.int64)  # int32, or uint16 bits (compact)
    if perm.shape != (block.shape[0],) or sorted(perm.tolist()) != list(range(block.shape[0])):
        raise ValueError(f"group {entry['group']}: permutation does not fit its {block.shape[0]} rows")
    original = np.empty_like(block)
    original[perm] = block  # (R, C) back in member order
    r0, rows = int(entry["row0"]), int(shape[0])
    if r0 < 0 or r0 + rows > block.shape[0] or list(shape[1:]) != [block.shape[1]]:
        raise ValueError(f"group {entry['group']}: rows [{r0}, {r0 + rows}) x {shape[1:]} outside its {block.shape}")
    return torch.from_numpy(np.ascontiguousarray(original[r0:r0 + rows]))
