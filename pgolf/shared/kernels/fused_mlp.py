"""Fused LeakyReLU(slope)^2 MLP: Triton GEMMs with the activation folded into their epilogues.

This module owns the fused MLP used by the model on CUDA (spec §5):

* forward: one persistent Triton GEMM computes pre = x @ W_up^T with an fp32 accumulator and its
  epilogue writes both `pre` and `post = LeakyReLU_slope(pre)^2` (activation computed on the
  output-dtype-rounded pre); out = post @ W_down^T is a cuBLAS matmul.
* backward: dW_down = g^T post (cuBLAS); the same kernel with FORWARD off computes
  dpost = g @ W_down and multiplies by the activation derivative read from `pre` -> dpre;
  dW_up = dpre^T x and dx = dpre @ W_up (cuBLAS). With save_post=False the forward keeps only
  `pre` for backward and the backward kernel rewrites `post` from `pre` in the same epilogue.

Saving only `pre` removes no forward write (the down projection must read `post`); it frees one
(M, H) activation per layer between forward and backward (302 MB per layer at M=98,304, H=1536,
bf16) and costs one more (M, H) write in the backward kernel (about 0.1 ms at ~3 TB/s). Memory is
not the limit at the record shapes, so save_post=True is the default; bench/bench_kernels.py
measures both ("fused" vs "fused_recompute_post").

Launch configurations are fixed per (device class, dtype, direction) in LAUNCH_TABLE (no
multi-config autotune, which needs a GPU driver). Under TRITON_INTERPRET=1 (set before importing
this module: the choice is made when the kernel is decorated) the kernels run on CPU tensors for
tests; there bf16 operands are upcast to fp32 inside the kernel (the interpreter's bf16 dot is
wrong). The two kernel launches are torch.library custom ops so torch.compile(fullgraph=True)
traces through the autograd.Function without a graph break.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from torch import Tensor

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton: TMA variant unavailable, pointer kernel only
    TensorDescriptor = None

# ----------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _act_epilogue(acc, offs_m, offs_n, M, N, pre_ptr, post_ptr, dpre_ptr, slope_sq,
                  FORWARD: tl.constexpr, STORE_POST: tl.constexpr):
    """acc: fp32 (BM, BN') tile of x@W_up^T (FORWARD) or g@W_down (backward); stores its outputs."""
    out_ty = pre_ptr.dtype.element_ty
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # (BM, BN') into a (M, N) row-major
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if FORWARD:
        pre = acc.to(out_ty)
        tl.store(pre_ptr + offs, pre, mask=mask)
        p = pre.to(tl.float32)  # activation on the rounded value, like the eager reference
    else:
        p = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dpre = acc * tl.where(p > 0, 2.0 * p, (2.0 * slope_sq) * p)
        tl.store(dpre_ptr + offs, dpre.to(out_ty), mask=mask)
    if FORWARD or STORE_POST:
        post = tl.where(p > 0, p * p, slope_sq * (p * p))
        tl.store(post_ptr + offs, post.to(out_ty), mask=mask)


@triton.jit
def _act_epilogue_tma(acc, off_m, off_n, pre_desc, post_desc, dpre_desc, slope_sq,
                      FORWARD: tl.constexpr, STORE_POST: tl.constexpr):
    """As _act_epilogue, the (BM, BN') tile at (off_m, off_n) read and written through TMA
    descriptors (the store clips rows and columns past the tensor's edge)."""
    out_ty = pre_desc.dtype
    if FORWARD:
        pre = acc.to(out_ty)
        pre_desc.store([off_m, off_n], pre)
        p = pre.to(tl.float32)
    else:
        p = pre_desc.load([off_m, off_n]).to(tl.float32)
        dpre = acc * tl.where(p > 0, 2.0 * p, (2.0 * slope_sq) * p)
        dpre_desc.store([off_m, off_n], dpre.to(out_ty))
    if FORWARD or STORE_POST:
        post = tl.where(p > 0, p * p, slope_sq * (p * p))
        post_desc.store([off_m, off_n], post.to(out_ty))


@triton.jit
def _store_tile(acc, off_m, off_n, M, N, pre, post, dpre, slope_sq, BM: tl.constexpr, BN: tl.constexpr,
                FORWARD: tl.constexpr, STORE_POST: tl.constexpr, TMA_STORE: tl.constexpr):
    """acc: the (BM, BN) tile at (off_m, off_n); pre/post/dpre are TMA descriptors or pointers."""
    if TMA_STORE:
        _act_epilogue_tma(acc, off_m, off_n, pre, post, dpre, slope_sq, FORWARD, STORE_POST)
    else:
        _act_epilogue(acc, off_m + tl.arange(0, BM), off_n + tl.arange(0, BN), M, N, pre, post, dpre,
                      slope_sq, FORWARD, STORE_POST)


@triton.jit
def _tile_epilogue(acc, off_m, off_n, M, N, pre, post, dpre, slope_sq,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FORWARD: tl.constexpr,
                   STORE_POST: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr, TMA_STORE: tl.constexpr):
    """The epilogue of the (BM, BN) tile at (off_m, off_n): whole, or as two (BM, BN/2) halves
    (lower register pressure in the epilogue)."""
    if SPLIT_EPILOGUE:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _store_tile(acc0, off_m, off_n, M, N, pre, post, dpre, slope_sq, BLOCK_M, BLOCK_N // 2,
                    FORWARD, STORE_POST, TMA_STORE)
        _store_tile(acc1, off_m, off_n + BLOCK_N // 2, M, N, pre, post, dpre, slope_sq, BLOCK_M,
                    BLOCK_N // 2, FORWARD, STORE_POST, TMA_STORE)
    else:
        _store_tile(acc, off_m, off_n, M, N, pre, post, dpre, slope_sq, BLOCK_M, BLOCK_N, FORWARD,
                    STORE_POST, TMA_STORE)


@triton.jit
def _gemm_act_kernel(
    a_ptr, b_ptr, pre_ptr, post_ptr, dpre_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk,
    slope_sq,
    FORWARD: tl.constexpr, STORE_POST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_PROGS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Persistent GEMM acc = A @ B^T (A: (M, K), B: (N, K) by strides) + activation epilogue."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * num_n
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, num_tiles, NUM_PROGS):
        pid_m = tile // num_n  # consecutive programs share an A row-block (L2 reuse); B is small
        pid_n = tile % num_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # ragged edges: out-of-range rows/cols read row/col 0 (always valid), dropped at the store
        offs_am = offs_m
        if not EVEN_M:
            offs_am = tl.where(offs_m < M, offs_m, 0)
        offs_bn = offs_n
        if not EVEN_N:
            offs_bn = tl.where(offs_n < N, offs_n, 0)
        # (BM, BK) and (BK, BN) tiles
        a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_bn.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        _tile_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, pre_ptr, post_ptr, dpre_ptr, slope_sq,
                       BLOCK_M, BLOCK_N, FORWARD, STORE_POST, SPLIT_EPILOGUE, False)


@triton.jit
def _gemm_act_kernel_tma(
    a_desc, b_desc, pre_ptr, post_ptr, dpre_ptr,
    M, N, K,
    slope_sq,
    FORWARD: tl.constexpr, STORE_POST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_PROGS: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr, B_KMAJOR: tl.constexpr,
    FLATTEN: tl.constexpr, TMA_STORE: tl.constexpr,
):
    """As _gemm_act_kernel, operands through TMA descriptors (out-of-range boxes read zeros).

    a_desc: (M, K) blocks [BM, BK]; b_desc: (N, K) blocks [BN, BK] if B_KMAJOR else (K, N) [BK, BN].
    TMA_STORE: pre/post/dpre are descriptors of (M, N) with blocks [BM, BN'] (BN' = BN/2 with
    SPLIT_EPILOGUE), else pointers."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * num_n
    for tile in tl.range(pid, num_tiles, NUM_PROGS, flatten=FLATTEN):
        pid_m = tile // num_n
        pid_n = tile % num_n
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            off_k = kb * BLOCK_K
            a = a_desc.load([off_m, off_k])  # (BM, BK)
            if B_KMAJOR:
                b = b_desc.load([off_n, off_k]).T  # (BK, BN)
            else:
                b = b_desc.load([off_k, off_n])  # (BK, BN)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        _tile_epilogue(acc, off_m, off_n, M, N, pre_ptr, post_ptr, dpre_ptr, slope_sq, BLOCK_M, BLOCK_N,
                       FORWARD, STORE_POST, SPLIT_EPILOGUE, TMA_STORE)


INTERPRETED = not isinstance(_gemm_act_kernel, triton.runtime.JITFunction)

# ----------------------------------------------------------------------------------------------
# Launch configurations


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_epilogue: bool = False
    max_programs: int = 0  # 0: one program per SM (persistent grid)
    tma: bool = False  # operands through TMA descriptors (falls back to pointers if misaligned)
    flatten: bool = False  # TMA kernel only: tl.range(flatten=True) pipelines across tiles
    tma_store: bool = False  # TMA kernel only: the epilogue reads/writes pre, post, dpre through TMA too
    kmajor_b: bool = False  # backward: W_down copied to (H, D) first, so its tiles load K-major as W_up's do


# (device class, dtype, direction) -> config. Device classes: "hopper" (sm_90+), "ampere" (sm_80+),
# "cuda" (older), "interp" (TRITON_INTERPRET on CPU: small tiles, 4 programs so the persistent
# tile loop runs several iterations). fp32 uses ieee dots and small tiles (tests only).
_HALF = (torch.bfloat16, torch.float16)
LAUNCH_TABLE: dict[tuple[str, torch.dtype, str], LaunchConfig] = {}
# Hopper: TMA operands (sm_90a compile, triton 3.9: fwd 194 regs / 197 KB smem, bwd 204 regs /
# 147 KB, no spills; the pointer kernel at 128x256 spills in the backward, 255 regs), tiles
# pipelined across (flatten), the epilogue through TMA, the backward's W_down K-major: 0.94x the
# TMA-only table at pr2135's shape, interleaved on one H100
# (bench/results/kernels_fused_mlp_h100_interleaved.json).
for _dt in _HALF:
    LAUNCH_TABLE[("hopper", _dt, "fwd")] = LaunchConfig(128, 256, 64, 8, 4, split_epilogue=True,
                                                        tma=True, flatten=True, tma_store=True)
    LAUNCH_TABLE[("hopper", _dt, "bwd")] = LaunchConfig(128, 256, 64, 8, 3, split_epilogue=True,
                                                        tma=True, flatten=True, tma_store=True,
                                                        kmajor_b=True)
    LAUNCH_TABLE[("ampere", _dt, "fwd")] = LaunchConfig(128, 128, 64, 8, 3)
    LAUNCH_TABLE[("ampere", _dt, "bwd")] = LaunchConfig(128, 128, 64, 8, 3)
for _cls in ("hopper", "ampere"):
    for _dir in ("fwd", "bwd"):
        LAUNCH_TABLE[(_cls, torch.float32, _dir)] = LaunchConfig(64, 64, 32, 4, 3)
for _dt in (*_HALF, torch.float32):
    for _dir in ("fwd", "bwd"):
        LAUNCH_TABLE[("cuda", _dt, _dir)] = LaunchConfig(64, 64, 32, 4, 2)
        LAUNCH_TABLE[("interp", _dt, _dir)] = LaunchConfig(32, 32, 32, 4, 1, max_programs=4)

_OVERRIDE: dict[str, LaunchConfig] = {}


@contextlib.contextmanager
def launch_config_override(fwd: LaunchConfig | None = None, bwd: LaunchConfig | None = None):
    """Temporarily force the configs used by the custom ops (benchmarks compare tile shapes)."""
    saved = dict(_OVERRIDE)
    _OVERRIDE.update({k: v for k, v in (("fwd", fwd), ("bwd", bwd)) if v is not None})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def _device_class(device: torch.device) -> str:
    if device.type != "cuda":
        return "interp"
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere" if major >= 8 else "cuda"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(direction: str, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """The config for `direction` ("fwd"|"bwd") at this dtype on this device."""
    if direction in _OVERRIDE:
        return _OVERRIDE[direction]
    key = (_device_class(device), dtype, direction)
    if key not in LAUNCH_TABLE:
        raise ValueError(f"fused_mlp: no launch config for {key}")
    return LAUNCH_TABLE[key]


# ----------------------------------------------------------------------------------------------
# Launchers (write into caller-provided outputs so tests can poison them)


def check_runnable(*tensors: Tensor, where: str = "fused_mlp") -> None:
    """The kernels of pgolf.shared.kernels can run on `tensors`: one device, CUDA without the
    Triton interpreter or a CPU with it; errors start with `where` (the public function)."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"{where}: tensors on different devices {[str(t.device) for t in tensors]}")
    if dev.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"{where}: needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "pgolf.shared.kernels is imported (CPU interpreter)")
    if dev.type == "cuda" and INTERPRETED:
        raise RuntimeError(f"{where}: TRITON_INTERPRET=1 was set when pgolf.shared.kernels was imported "
                           "but the tensors are on CUDA; set it only on machines without CUDA")


_FALLBACK: dict[LaunchConfig, LaunchConfig] = {}  # configs that did not fit -> config used


def _smaller(cfg: LaunchConfig) -> LaunchConfig | None:
    if cfg.num_stages > 2:
        return dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 128:
        return dataclasses.replace(cfg, block_n=128, num_stages=3)
    return None


def _tma_ok(*tensors: Tensor) -> bool:
    return TensorDescriptor is not None and all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
        for t in tensors)


def _check_outputs(shape: tuple[int, int], dtype: torch.dtype, *outs: Tensor) -> None:
    for t in outs:
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"fused_mlp: (M, H) buffers must be contiguous {shape} {dtype}, "
                             f"got {tuple(t.shape)} {t.dtype} contiguous={t.is_contiguous()}")


def _launch(a: Tensor, b: Tensor, b_kmajor: bool, N: int, pre: Tensor, post: Tensor,
            dpre: Tensor, slope: float, forward: bool, store_post: bool,
            config: LaunchConfig | None) -> None:
    """acc = a @ B^T, B = b (N, K) if b_kmajor else b^T with b (K, N); epilogue by flags.

    A config that needs more shared memory than the device has is shrunk (fewer stages, then
    BLOCK_N 128), and a TMA config whose kernel fails to build on CUDA is replaced by the pointer
    kernel, each with a warning; the substitution is remembered in _FALLBACK. A kmajor_b config
    gets an N-major b (K, N) as its (N, K) copy."""
    cfg = config or launch_config("fwd" if forward else "bwd", a.dtype, a.device)
    cfg = _FALLBACK.get(cfg, cfg)
    if cfg.kmajor_b and not b_kmajor:
        b, b_kmajor = b.t().contiguous(), True  # (N, K)
    while True:
        try:
            _launch_cfg(a, b, b_kmajor, N, pre, post, dpre, slope, forward, store_post, cfg)
            return
        except OutOfResources as exc:
            smaller = _smaller(cfg)
            if smaller is None:
                raise
            warnings.warn(f"fused_mlp: {cfg} does not fit ({exc}); trying {smaller}")
        except Exception as exc:  # noqa: BLE001 - a TMA compile/launch failure: use pointers
            if not cfg.tma or a.device.type != "cuda":
                raise
            smaller = dataclasses.replace(cfg, tma=False)
            warnings.warn(f"fused_mlp: TMA kernel failed ({type(exc).__name__}: {exc}); "
                          f"using pointer loads")
        for k, v in list(_FALLBACK.items()):
            if v == cfg:
                _FALLBACK[k] = smaller
        _FALLBACK[cfg] = smaller
        cfg = smaller


def _launch_cfg(a, b, b_kmajor, N, pre, post, dpre, slope, forward, store_post, cfg):
    M, K = a.shape
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    progs = cfg.max_programs or (_num_sms(a.device.index or 0) if a.device.type == "cuda" else tiles)
    progs = max(1, min(progs, tiles))
    common = dict(
        FORWARD=forward, STORE_POST=store_post,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_PROGS=progs,
        UPCAST=(INTERPRETED and a.dtype == torch.bfloat16), SPLIT_EPILOGUE=cfg.split_epilogue,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.tma and _tma_ok(a, b):
        a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
        b_block = [cfg.block_n, cfg.block_k] if b_kmajor else [cfg.block_k, cfg.block_n]
        b_desc = TensorDescriptor.from_tensor(b, b_block)
        outs, tma_store = (pre, post, dpre), cfg.tma_store and _tma_ok(pre, post, dpre)
        if tma_store:  # (M, N) each, one box per epilogue tile
            box = [cfg.block_m, cfg.block_n // 2 if cfg.split_epilogue else cfg.block_n]
            outs = tuple(TensorDescriptor.from_tensor(t, box) for t in outs)
        _gemm_act_kernel_tma[(progs,)](a_desc, b_desc, *outs, M, N, K,
                                       float(slope) ** 2, B_KMAJOR=b_kmajor,
                                       FLATTEN=cfg.flatten, TMA_STORE=tma_store, **common)
        return
    # B[n, k] strides: b (N, K) -> (stride0, stride1); b (K, N) -> (stride1, stride0)
    sbn, sbk = (b.stride(0), b.stride(1)) if b_kmajor else (b.stride(1), b.stride(0))
    _gemm_act_kernel[(progs,)](a, b, pre, post, dpre, M, N, K, a.stride(0), a.stride(1), sbn, sbk,
                               float(slope) ** 2, EVEN_M=(M % cfg.block_m == 0),
                               EVEN_N=(N % cfg.block_n == 0), EVEN_K=(K % cfg.block_k == 0),
                               **common)


def launch_up_act(x: Tensor, w_up: Tensor, pre: Tensor, post: Tensor, slope: float,
                  config: LaunchConfig | None = None) -> None:
    """pre = x @ w_up^T, post = LeakyReLU_slope(pre)^2.

    x (M, D), w_up (H, D), pre/post (M, H) contiguous."""
    check_runnable(x, w_up, pre, post)
    _check_outputs((x.shape[0], w_up.shape[0]), x.dtype, pre, post)
    _launch(x, w_up, True, w_up.shape[0], pre, post, pre, slope,
            forward=True, store_post=True, config=config)


def launch_act_bwd(g: Tensor, w_down: Tensor, pre: Tensor, dpre: Tensor, post: Tensor | None,
                   slope: float, config: LaunchConfig | None = None) -> None:
    """dpre = (g @ w_down) * act'(pre); also post = act(pre) when `post` is given.

    g (M, D), w_down (D, H), pre/dpre/post (M, H) contiguous."""
    check_runnable(g, w_down, pre, dpre)
    _check_outputs((g.shape[0], w_down.shape[1]), g.dtype, pre, dpre,
                   *(() if post is None else (post,)))
    _launch(g, w_down, False, w_down.shape[1], pre, dpre if post is None else post, dpre, slope,
            forward=False, store_post=post is not None, config=config)


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to Dynamo/Inductor; shapes from the fake implementations)


@torch.library.custom_op("pgolf::mlp_up_act", mutates_args=())
def mlp_up_act(x: Tensor, w_up: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """(pre, post), each (M, H)."""
    M, H = x.shape[0], w_up.shape[0]
    pre = torch.empty((M, H), device=x.device, dtype=x.dtype)
    post = torch.empty_like(pre)
    launch_up_act(x, w_up, pre, post, slope)
    return pre, post


@mlp_up_act.register_fake
def _(x, w_up, slope):
    pre = x.new_empty((x.shape[0], w_up.shape[0]))
    return pre, torch.empty_like(pre)


@torch.library.custom_op("pgolf::mlp_act_bwd", mutates_args=())
def mlp_act_bwd(g: Tensor, w_down: Tensor, pre: Tensor, slope: float) -> Tensor:
    """dpre (M, H)."""
    pre = pre.contiguous()
    dpre = torch.empty_like(pre)
    launch_act_bwd(g, w_down, pre, dpre, None, slope)
    return dpre


@mlp_act_bwd.register_fake
def _(g, w_down, pre, slope):
    return torch.empty_like(pre, memory_format=torch.contiguous_format)


@torch.library.custom_op("pgolf::mlp_act_bwd_post", mutates_args=())
def mlp_act_bwd_post(g: Tensor, w_down: Tensor, pre: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """(dpre, post), each (M, H): the backward kernel also recomputes post from pre."""
    pre = pre.contiguous()
    dpre = torch.empty_like(pre)
    post = torch.empty_like(dpre)
    launch_act_bwd(g, w_down, pre, dpre, post, slope)
    return dpre, post


@mlp_act_bwd_post.register_fake
def _(g, w_down, pre, slope):
    dpre = torch.empty_like(pre, memory_format=torch.contiguous_format)
    return dpre, torch.empty_like(dpre)


# ----------------------------------------------------------------------------------------------
# Autograd and public API


class FusedLeakyReLUSqMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_up, w_down, slope: float, save_post: bool):
        # x (M, D), w_up (H, D), w_down (D, H)
        pre, post = torch.ops.pgolf.mlp_up_act(x, w_up, slope)  # (M, H) each
        out = F.linear(post, w_down)  # (M, D)
        ctx.slope, ctx.save_post = slope, save_post
        if save_post:
            ctx.save_for_backward(x, w_up, w_down, pre, post)
        else:
            ctx.save_for_backward(x, w_up, w_down, pre)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w_up, w_down, pre, *saved_post = ctx.saved_tensors
        g = g.contiguous()  # (M, D)
        if ctx.save_post:
            post = saved_post[0]
            dpre = torch.ops.pgolf.mlp_act_bwd(g, w_down, pre, ctx.slope)  # (M, H)
        else:
            dpre, post = torch.ops.pgolf.mlp_act_bwd_post(g, w_down, pre, ctx.slope)
        dw_down = g.t() @ post  # (D, H)
        dw_up = dpre.t() @ x  # (H, D)
        dx = dpre @ w_up  # (M, D)
        return dx, dw_up, dw_down, None, None


def _check_shapes(x: Tensor, w_up: Tensor, w_down: Tensor) -> None:
    D = x.shape[-1]
    if w_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError(f"fused_mlp: weights must be 2-D, got w_up {tuple(w_up.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    H = w_up.shape[0]
    if w_up.shape[1] != D or tuple(w_down.shape) != (D, H):
        raise ValueError(f"fused_mlp: x (..., {D}) needs w_up ({H}, {D}) and w_down ({D}, {H}); "
                         f"got w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"fused_mlp: unsupported dtype {x.dtype}")


def fused_leaky_relu_sq_mlp(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float = 0.5,
                            save_post: bool = True) -> Tensor:
    """LeakyReLU_slope(x @ w_up^T)^2 @ w_down^T via the fused kernels; x (..., D) -> (..., D).

    Weights are cast to x's dtype (differentiably). save_post=False keeps only `pre` for backward
    and recomputes `post` in the backward kernel (less activation memory, one more (M, H) write)."""
    _check_shapes(x, w_up, w_down)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = FusedLeakyReLUSqMLP.apply(x2, w_up.to(x.dtype), w_down.to(x.dtype), float(slope),
                                    bool(save_post))
    return out.reshape(*lead, out.shape[-1])


def eager_mlp(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float = 0.5) -> Tensor:
    """Reference: F.linear -> leaky_relu -> square -> F.linear."""
    return F.linear(F.leaky_relu(F.linear(x, w_up), negative_slope=slope).square(), w_down)
