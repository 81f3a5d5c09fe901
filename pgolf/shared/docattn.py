"""Document-packed attention (PR #2135's training layout): causal attention within segments of one
packed row of tokens, never across them.

This module owns document attention for `train.doc_packing`:

* `doc_starts` / `build_cu_seqlens` (host, numpy): a row of n tokens -> int32 cu_seqlens, the
  boundaries of its segments. A segment starts at the row's first token, at every BOS (a new
  document) and every `max_len` tokens within a document counted from its start in the row (so no
  segment is longer than `max_len`); the boundaries end with n and are padded with repeated n up
  to a multiple of `CU_BUCKET` entries (empty segments), so that a kernel sees few distinct shapes.
* `segments(cu_seqlens, n, max_len, backend)` (device, no host sync) -> `DocSegments`: what the
  model's forward needs, built once per micro-batch outside any compiled graph: the cu_seqlens,
  each token's segment id and position within its segment, and the backend's block mask (flex).
  The model only calls `DocSegments.rope` (RoPE tables at the per-segment positions) and
  `DocSegments.attend` (the attention), so pgolf.shared.model imports this module only for
  `model.attn_backend: fa4` (`use_flash_impl`, the process-wide kernel swap this module owns).
* `doc_attention(q, k, v, docs)`: q (N, H, hd), k/v (N, Hkv, hd) -> (N, H, hd), each query
  attending to the keys of its own segment up to itself, by one of BACKENDS:

  - `reference`: exact banded attention in plain SDPA with a boolean mask. Every segment fits in
    max_len tokens, so a query in block b of max_len tokens sees only keys of blocks b-1 and b:
    SDPA over (N/max_len) blocks of max_len queries x 2*max_len keys, the mask keeping the same
    segment and key <= query. O(N * max_len) memory, static shapes, any device and dtype, and
    differentiable (the CPU's backend, and the one the others are checked against).
  - `varlen`: torch.nn.attention.varlen.varlen_attn (torch >= 2.10; FlashAttention-2 kernels
    bundled with CUDA torch; `varlen_signature` adapts to its changing keywords: is_causal or
    window_size (-1, 0), enable_gqa or K/V repeated). CUDA, fp16/bf16.
  - `flex`: FlexAttention with a document mask_mod and a BlockMask built from the segment ids
    (`flex_block_mask`: block structure from each block's first and last segment, no N x N
    tensor). Fused only inside torch.compile; called eagerly on CUDA (the Hessian capture, an
    uncompiled run) it uses `varlen` instead, as flex's eager path materialises N x N scores.
  - `fa4` / `fa3`: varlen_attn's op after torch's flash-attention registry swapped FlashAttention-4
    (`flash_attn.cute`, package flash-attn-4; SM 9.x/10.x) or -3 (`flash_attn_interface`; SM 9.0)
    into aten's flash kernels, asked for causal attention without a window (`flash_impl_attention`).
    The swap is process-wide: it also serves SDPA's flash backend.

  `resolve("auto", device)`: `reference` on a CPU; on CUDA the first available of AUTO_ORDER.

RoPE: the row is longer than train.seq_len, but positions restart at every segment, so they stay
below max_len <= train.seq_len and the model's unscaled tables serve (no NTK base scaling). RoPE is
relative, so within a segment this equals whole-row positions with the unscaled base
(tests/test_docattn.py checks it); the record (PR #2135) uses whole-row positions, and since its
row is longer than its train_seq_len its rotary caches NTK-scaled tables for them.

Compile: x is (1, micro_tokens) in every micro-batch; cu_seqlens' length is marked dynamic
(torch._dynamo.maybe_mark_dynamic) and padded to multiples of CU_BUCKET, so the compiled forward
is one graph per sequence length (max_len is a Python int baked into it), not one per layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pgolf.config import DOC_ATTN_BACKENDS

CU_BUCKET = 64  # cu_seqlens entries are padded to a multiple of this (PR #2135: 64)
FLEX_BLOCK = 128  # FlexAttention's block size (its default)
BACKENDS = tuple(b for b in DOC_ATTN_BACKENDS if b != "auto")  # reference, varlen, flex, fa4, fa3
# auto on CUDA: the first available, fastest first as measured on one H100 (torch 2.11,
# bench/results/attention_h100_docattn.json): one packed row of 98,304 tokens, fwd+bwd, flex
# 2.77-3.21 ms, varlen_attn 3.17-3.71 ms, reference 16.3 ms. fa4/fa3 stay explicit (not installed
# on the lent machines, unmeasured).
AUTO_ORDER = ("flex", "varlen")
_FLASH_IMPLS = {"fa4": ("FA4", "flash_attn.cute.interface", (9, 10)), "fa3": ("FA3", "flash_attn_interface", (9,))}


# ----------------------------------------------------------------------------- cu_seqlens (host)


def doc_starts(tokens, bos_id: int | None = None) -> np.ndarray:
    """Positions (int64, ascending) of the BOS tokens of a row: where its documents start."""
    if bos_id is None:
        from pgolf.shared.shards import BOS_ID as bos_id
    return np.flatnonzero(np.asarray(tokens) == bos_id).astype(np.int64)


def build_cu_seqlens(starts, n: int, max_len: int, bucket: int = CU_BUCKET) -> np.ndarray:
    """Segment boundaries of a row of n tokens whose documents start at `starts` (BOS positions)
    -> int32 (S,), S a multiple of `bucket`: 0, every document start, every max_len tokens within
    a document from its start, n, then n repeated (empty segments). The row's first token always
    starts a segment (a document begun in the previous row)."""
    if n < 1 or max_len < 1 or bucket < 1:
        raise ValueError(f"build_cu_seqlens: n {n}, max_len {max_len} and bucket {bucket} must be >= 1")
    if n >= 2**31:
        raise ValueError(f"build_cu_seqlens: a row of {n} tokens does not fit int32 cu_seqlens")
    s = np.unique(np.concatenate([[0], np.asarray(starts, dtype=np.int64).reshape(-1)]))
    if s[-1] >= n or s[0] < 0:
        raise ValueError(f"build_cu_seqlens: document starts must lie in [0, {n}), got {s.min()}..{s.max()}")
    pieces = -(-(np.append(s[1:], n) - s) // max_len)  # (D,) segments per document, >= 1
    first = np.repeat(s, pieces)  # each segment's document start
    k = np.arange(first.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # its index within the document
    bounds = np.append(first + k * max_len, n)
    size = -(-bounds.size // bucket) * bucket
    return np.concatenate([bounds, np.full(size - bounds.size, n)]).astype(np.int32)


def segment_lengths(cu_seqlens) -> np.ndarray:
    """The non-empty segments' lengths of a (padded) cu_seqlens."""
    d = np.diff(np.asarray(cu_seqlens, dtype=np.int64))
    return d[d > 0]


def check_cu_seqlens(cu_seqlens, n: int, max_len: int) -> None:
    """ValueError unless cu_seqlens starts at 0, never decreases, ends at n, and no segment is
    longer than max_len (the contract of every backend)."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != n or np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_seqlens must run from 0 to {n} without decreasing, got {cu[:8].tolist()}...")
    longest = int(np.diff(cu).max())
    if longest > max_len:
        raise ValueError(f"cu_seqlens has a segment of {longest} tokens, longer than max_len {max_len}")


# ----------------------------------------------------------------------------- segments (device)


@dataclass(frozen=True)
class DocSegments:
    """One packed row's segments on the row's device (see `segments`)."""

    cu_seqlens: Tensor  # (S,) int32, padded with repeated n
    max_len: int  # every segment has at most this many tokens (train.seq_len of the step)
    seg_ids: Tensor  # (n,) int32: each token's segment, non-decreasing from 0
    positions: Tensor  # (n,) int64: each token's position within its segment
    backend: str  # one of BACKENDS
    block_mask: Any = None  # flex: the BlockMask of the document mask

    @property
    def n(self) -> int:
        return self.seg_ids.numel()

    def rope(self, rotary) -> tuple[Tensor, Tensor]:
        """cos, sin (n, rd/2) at each token's position in its segment; `rotary(T, device)` gives
        the tables of positions 0..T-1 (pgolf.shared.model.Rotary)."""
        cos, sin = rotary(self.max_len, self.positions.device)  # (max_len, rd/2): unscaled tables
        return cos[self.positions], sin[self.positions]

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The model's call: q (1, n, H, hd), k/v (1, n, Hkv, hd) -> (1, n, H, hd)."""
        if q.dim() != 4 or q.size(0) != 1 or q.size(1) != self.n:
            raise ValueError(f"document attention takes one packed row of {self.n} tokens, got q {tuple(q.shape)}")
        return doc_attention(q[0], k[0], v[0], self)[None]


def segments(cu_seqlens: Tensor, n: int, max_len: int, backend: str = "reference") -> DocSegments:
    """The DocSegments of a row of n tokens from its cu_seqlens (int32, on the row's device; a
    CPU one is checked with `check_cu_seqlens`). Device ops only (no host sync); the flex block
    mask too. `backend` as `resolve` returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"doc attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if cu_seqlens.device.type == "cpu":
        check_cu_seqlens(cu_seqlens.numpy(), n, max_len)
    cu = cu_seqlens.to(torch.int32).contiguous()
    torch._dynamo.maybe_mark_dynamic(cu, 0)  # one compiled graph whatever the number of segments
    t = torch.arange(n, device=cu.device, dtype=torch.int32)
    seg = torch.searchsorted(cu, t, right=True) - 1  # (n,) last boundary <= t (padding: n > t)
    positions = (t - cu[seg]).long()
    seg = seg.to(torch.int32)
    mask = flex_block_mask(seg) if backend == "flex" else None
    if backend != "reference" and cu.is_cuda:
        try:
            varlen_signature()  # read here, eagerly: the traced varlen call only reads the result
        except ImportError:
            pass  # a torch without varlen_attn: `resolve` never picks it
    return DocSegments(cu, int(max_len), seg, positions, backend, mask)


def segments_of_row(tokens, max_len: int, backend: str = "reference", device="cpu",
                    bos_id: int | None = None) -> DocSegments:
    """`segments` of a row of tokens (1-D) from its BOS positions (host copy: one sync)."""
    tokens = np.asarray(tokens.cpu() if isinstance(tokens, Tensor) else tokens).reshape(-1)
    cu = build_cu_seqlens(doc_starts(tokens, bos_id), tokens.size, max_len)
    check_cu_seqlens(cu, tokens.size, max_len)
    return segments(torch.from_numpy(cu).to(device), tokens.size, max_len, backend)


# ----------------------------------------------------------------------------- the attention


def doc_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocSegments) -> Tensor:
    """q (n, H, hd), k/v (n, Hkv, hd) -> (n, H, hd): causal attention within docs' segments, by
    docs.backend. Under autocast all three are cast to its dtype first (else to q's)."""
    dev = q.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    backend = docs.backend
    if backend == "flex" and q.is_cuda and not torch.compiler.is_compiling():
        backend = "varlen" if varlen_available(q.device) else "reference"  # eager flex: N x N scores
    if backend in ("varlen", "fa4", "fa3") and dt not in (torch.float16, torch.bfloat16):
        backend = "reference"  # flash kernels take half precision only
    return _ATTEND[backend](q, k, v, docs)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocSegments) -> Tensor:
    """Exact banded attention (see the module doc): blocks of L = max_len queries x 2L keys."""
    n, H, hd = q.shape
    L = docs.max_len
    nb = -(-n // L)
    pad = nb * L - n
    seg = F.pad(docs.seg_ids.long(), (0, pad), value=-1)  # (nb*L,): padding is its own segment
    qp, kp, vp = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))  # (nb*L, h, hd)

    def two_blocks(x: Tensor, fill) -> Tensor:  # (nb*L, ...) -> (nb, 2L, ...): block b-1 then block b
        prev = torch.cat([torch.full_like(x[:L], fill), x[:-L]]).view(nb, L, *x.shape[1:])
        return torch.cat([prev, x.view(nb, L, *x.shape[1:])], dim=1)

    qb = qp.view(nb, L, H, hd).transpose(1, 2)  # (nb, H, L, hd)
    kb, vb = two_blocks(kp, 0).transpose(1, 2), two_blocks(vp, 0).transpose(1, 2)  # (nb, Hkv, 2L, hd)
    qpos = torch.arange(nb * L, device=q.device).view(nb, L)
    kpos = torch.cat([qpos - L, qpos], dim=1)  # (nb, 2L)
    same = two_blocks(seg, -2)[:, None, :] == seg.view(nb, L)[:, :, None]  # (nb, L, 2L); -2: before the row
    mask = same & (kpos[:, None, :] <= qpos[:, :, None])
    if q.is_cuda:  # SDPA's masked kernel (memory-efficient) takes no GQA: K/V repeated to H heads
        kb, vb = kb.repeat_interleave(H // kb.size(1), 1), vb.repeat_interleave(H // vb.size(1), 1)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], enable_gqa=True)  # (nb, H, L, hd)
    return y.transpose(1, 2).reshape(nb * L, H, hd)[:n]


_VARLEN_SIG: tuple[bool, bool] | None = None  # (causal by window_size, takes enable_gqa): `varlen_signature`


def varlen_signature() -> tuple[bool, bool]:
    """How this torch's varlen_attn is asked for causal GQA attention; its signature changed
    across releases: `is_causal=True` (2.10) or `window_size=(-1, 0)` (later), and `enable_gqa`
    (2.12 on; before it K/V are repeated to the query heads). Read once, outside any compiled
    graph (`segments` calls it), and kept in a module global the traced code reads."""
    global _VARLEN_SIG
    if _VARLEN_SIG is None:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        _VARLEN_SIG = ("is_causal" not in params and "window_size" in params, "enable_gqa" in params)
    return _VARLEN_SIG


def _heads_for(q: Tensor, k: Tensor, v: Tensor, gqa: bool) -> tuple[Tensor, Tensor]:
    """k, v as the kernel takes them: as they are with enable_gqa, else repeated to q's heads."""
    if gqa or k.size(1) == q.size(1):
        return k, v
    return k.repeat_interleave(q.size(1) // k.size(1), 1), v.repeat_interleave(q.size(1) // v.size(1), 1)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocSegments) -> Tensor:
    """torch's varlen_attn over the segments (flash kernels: CUDA, fp16/bf16)."""
    from torch.nn.attention.varlen import varlen_attn

    by_window, gqa = _VARLEN_SIG or varlen_signature()
    kw = {"window_size": (-1, 0)} if by_window else {"is_causal": True}
    if gqa:
        kw["enable_gqa"] = True
    k, v = _heads_for(q, k, v, gqa)
    L = docs.max_len
    return varlen_attn(q, k, v, docs.cu_seqlens, docs.cu_seqlens, L, L, **kw)


def flex_attention_docs(q: Tensor, k: Tensor, v: Tensor, docs: DocSegments) -> Tensor:
    """FlexAttention with docs.block_mask (built by `segments` for backend flex)."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = docs.block_mask if docs.block_mask is not None else flex_block_mask(docs.seg_ids)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, h, n, hd)
    return flex_attention(qh, kh, vh, block_mask=mask, enable_gqa=True)[0].transpose(0, 1)


def flash_impl_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocSegments) -> Tensor:
    """varlen attention on the flash implementation `use_flash_impl` activated (fa4 / fa3), asked
    for as causal with no window. Where varlen_attn says causal as window (-1, 0), aten hands FA4 a
    right window of 0, and FA4 4.0.0b18's SM90 backward refuses windowed attention (bench_attention
    on an H100, 2026-12-07); so this calls varlen_attn's custom op, torch.ops.torch_attn._varlen_attn
    (its backward registered with it), with is_causal and window (-1, -1): its first ten arguments
    are the same in every release that has window_size."""
    by_window, gqa = _VARLEN_SIG or varlen_signature()
    if not by_window:
        return varlen_attention(q, k, v, docs)
    import torch.nn.attention.varlen  # noqa: F401 - registers torch.ops.torch_attn

    k, v = _heads_for(q, k, v, gqa)
    L, cu = docs.max_len, docs.cu_seqlens
    gqa_arg = (True,) if gqa else ()
    return torch.ops.torch_attn._varlen_attn(q, k, v, cu, cu, L, L, True, None, [-1, -1], *gqa_arg)[0]


_ATTEND = {"reference": reference_attention, "varlen": varlen_attention, "flex": flex_attention_docs,
           "fa4": flash_impl_attention, "fa3": flash_impl_attention}


# ----------------------------------------------------------------------------- flex block mask


def _doc_mask_mod(seg: Tensor):
    def doc_causal(b, h, q_idx, kv_idx):
        return (seg[q_idx] == seg[kv_idx]) & (q_idx >= kv_idx)
    return doc_causal


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(nq, nk) bool block matrix -> counts (1, 1, nq) and indices (1, 1, nq, nk), int32, each
    row's True columns first in ascending order (FlexAttention's layout)."""
    num = dense.sum(-1).to(torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None], idx[None, None]


def flex_block_mask(seg_ids: Tensor, block: int = FLEX_BLOCK):
    """BlockMask of causal attention within segments for segment ids (n,) that never decrease.
    Blocks i (queries) and j <= i (keys) interact iff the first segment of block i is <= the last
    of block j; they are full (mask_mod not needed) iff j < i and block j's first segment is block
    i's last (one segment spans both). The mask_mod reads the ids padded to whole blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    n = seg_ids.numel()
    nb = -(-n // block)
    seg = F.pad(seg_ids.to(torch.int32), (0, nb * block - n), value=-1)  # (nb*block,)
    b = torch.arange(nb, device=seg.device)
    first = seg[b * block]  # (nb,) each block's first segment
    last = seg_ids.to(torch.int32)[torch.clamp((b + 1) * block, max=n) - 1]  # (nb,) and its last
    i, j = b[:, None], b[None, :]
    touch = (j <= i) & (first[:, None] <= last[None, :])
    full = (j < i) & (first[None, :] == last[:, None])
    kv_num, kv_idx = _ordered(touch & ~full)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=_doc_mask_mod(seg), seq_lengths=(n, n))


# ----------------------------------------------------------------------------- backends


def varlen_available(device) -> bool:
    """torch's varlen_attn runs here: a CUDA device and a torch build with flash attention."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return bool(torch.backends.cuda.is_flash_attention_available())


def flex_available(device) -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.device(device).type == "cuda"


def flash_impl_installed(name: str, device) -> bool:
    """fa4 / fa3: a CUDA device whose compute capability is among its kinds, and its module importable."""
    _, module, majors = _FLASH_IMPLS[name]
    if torch.device(device).type != "cuda" or torch.cuda.get_device_capability(torch.device(device))[0] not in majors:
        return False
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return False
    return True


def flash_impl_available(name: str, device) -> bool:
    """fa4 / fa3 as aten's flash kernels: installed here, varlen_attn present and torch's flash
    registry listing it."""
    if not (varlen_available(device) and flash_impl_installed(name, device)):
        return False
    from torch.nn import attention

    impl = _FLASH_IMPLS[name][0]
    return impl in attention.list_flash_attention_impls() if hasattr(attention, "list_flash_attention_impls") else False


def available(device) -> list[str]:
    """The backends that can train on `device`, in BACKENDS order (flex on a CPU runs forward only)."""
    checks = {"reference": lambda d: True, "varlen": varlen_available, "flex": flex_available,
              "fa4": lambda d: flash_impl_available("fa4", d), "fa3": lambda d: flash_impl_available("fa3", d)}
    return [b for b in BACKENDS if checks[b](device)]


def use_flash_impl(name: str | None) -> None:
    """Process-wide: aten's flash kernels from FlashAttention-4/-3 (`fa4` / `fa3`), or torch's
    own (None). Changes only what differs from the current state."""
    from torch.nn import attention

    if not all(hasattr(attention, f"{verb}_flash_attention_impl") for verb in ("activate", "current", "restore")):
        if name is not None:
            raise RuntimeError("this torch has no flash-attention registry (activate_flash_attention_impl)")
        return
    current = attention.current_flash_attention_impl()
    want = None if name is None else _FLASH_IMPLS[name][0]
    if current == want:
        return
    if want is None:
        attention.restore_flash_attention_impl()
    else:
        attention.activate_flash_attention_impl(want)


def current_flash_impl() -> str:
    """The flash kernels aten runs now: "FA4" / "FA3" once activated, else "torch" (its own)."""
    from torch.nn import attention

    current = getattr(attention, "current_flash_attention_impl", lambda: None)()
    return current or "torch"


def resolve(name: str, device) -> str:
    """The backend `train.doc_attn_backend` names on `device` (auto: `reference` on a CPU, the first
    available of AUTO_ORDER on CUDA); ValueError for one that cannot run there. A flash
    implementation (fa4 / fa3) is activated process-wide here."""
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "reference"
        here = available(device)
        return next((b for b in AUTO_ORDER if b in here), "reference")
    if name not in BACKENDS:
        raise ValueError(f"doc attention backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
    if name != "reference" and name not in available(device):
        raise ValueError(f"doc attention backend {name!r} cannot train on {device} here "
                         f"(available: {', '.join(available(device))})")
    if name in _FLASH_IMPLS:
        use_flash_impl(name)
    return name


def attention_flops(cu_seqlens, hd: int, heads: int, fwd_bwd: bool = True) -> float:
    """Useful FLOPs of causal attention over the segments (2 GEMMs forward, 5 with the backward,
    each 2 * l * (l + 1) / 2 * hd multiply-adds per head): the benches' TFLOP/s numerator."""
    lengths = segment_lengths(cu_seqlens).astype(np.float64)
    per_gemm = float(np.sum(lengths * (lengths + 1) / 2)) * 2 * hd * heads
    return per_gemm * (7 if fwd_bwd else 2)


__all__ = ["AUTO_ORDER", "BACKENDS", "CU_BUCKET", "DocSegments", "available", "build_cu_seqlens", "check_cu_seqlens",
           "doc_attention", "doc_starts", "flex_block_mask", "reference_attention", "resolve", "segment_lengths",
           "segments", "segments_of_row", "use_flash_impl"]
