"""The record GPT (recipe-spec §3, PR #1072 choices): architecture, banks, QAT, online Hessians.

This module owns the network: BigramHash + SmearGate front end, 11 pre-norm blocks with GQA
attention (QK-norm, partial RoPE with the NTK rule, per-head query gain, XSA), value embeddings
on the last layers, LeakyReLU(0.5)^2 MLP, U-Net skips, tied softcapped head. The 66 block
matrices live in four 3-D fp32 parameter banks (spec §3.9); `export_state_dict` /
`load_export_state_dict` convert to and from the per-layer names used by quantization.

Precision: every parameter is fp32; the training loop runs the forward under bf16 autocast on
CUDA; `model.residual_dtype: bf16` casts the residual stream (embeddings onward) to the autocast
dtype, as the record script's bf16 model does. Late QAT (spec §4.8, §12.3) is not in the graph:
`qat_weights()` swaps Q(w) into the banks for one optimizer step's forwards and backwards and
restores w before the update, which is the straight-through estimator exactly (the forward sees
Q(w), the gradient lands unchanged on w) at the cost of one fake-quantisation per step instead of
one per micro-batch, and switching it on never recompiles a `torch.compile`d model.
When `forward` gets a `hessians` dict it adds x^T x (fp32) of every quantizable matrix's input
into it in place (spec §6.5).

Knobs of the later records, each off / at the seeds' value by default: `smear_bos_mask` (no
SmearGate mix at a BOS), `logit_softcap_neg` (asymmetric softcap), `attn_gate_window` /
`attn_gate_scale` (sparse per-head attention output gate), a real `mlp_mult` (ModelConfig.mlp_hidden),
`parallel_start_layer` / `parallel_final_lane` (two residual lanes in the decoder), `num_loops` /
`loop_start` / `loop_end` (depth recurrence: `layer_order`; a looped layer's Hessian sums the
inputs of every pass and QAT quantizes its one set of weights).

PR #2135's front end and head, each off by default: `bigram_buckets: 0` (no BigramHash),
`smear_form: add` (`AddSmearGate`: e_t + lam * sigmoid(W . e_t[:smear_window]) * e_{t-1} on the raw
embeddings, then the norm), `skip_gates` (h <- lerp(w * skip, h, sigmoid(g)) at each U-Net skip),
`rope_ntk: false` (one RoPE base at every length), `logit_softcap_learned` (learned scalars
`softcap_pos` / `softcap_neg` cap the eval logits, `logits_from_hidden`; the training loss,
`loss_from_hidden`, keeps the fixed caps, and the training optimizers leave them alone:
`optimizer_groups()["untrained"]`), `parallel_lambdas_all_layers` (the lane lambdas get a row per
layer as #2135 allocates them; the rows below the parallel start are never read).

Document packing (train.doc_packing, PR #2135's training layout): `forward(..., docs=...)` takes
one packed row (B = 1) and a pgolf.shared.docattn.DocSegments; each attention then stays within
its document segments (`docs.attend`) and RoPE runs at the positions within them (`docs.rope`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pgolf.config import MATRIX_KINDS, ModelConfig
from pgolf.shared.shards import BOS_ID
from pgolf.shared.rowquant import fake_quant_values, qmax_for

try:  # FlashAttention-3 (Hopper); optional, SDPA otherwise (spec §11)
    from flash_attn_interface import flash_attn_func as _fa3_func

    HAS_FA3 = True
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _fa3_func = None
    HAS_FA3 = False

QAT_BITS = 6
BIGRAM_MUL_CUR = 36313
BIGRAM_MUL_PREV = 27191
PARALLEL_RESID_INIT = 1.1  # the records' init of the lanes' self-weights (post weights start at 1)
HEAD_HESSIAN = "tok_emb.weight"  # the tied head's input Gram in a Hessian dict (GPT.head_hessian)
ATTN_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "fa4": SDPBackend.FLASH_ATTENTION}  # fa4: see use_fa4_kernels


def layer_order(cfg: ModelConfig, looping: bool = True) -> list[int]:
    """The layers a forward runs, in order: 0..L-1, or with depth recurrence the range
    loop_start..loop_end num_loops + 1 times (11 layers, 3..5, 2 loops: 0 1 2 3 4 5 3 4 5 3 4 5 6 ...).
    The first half of the list (rounded down) is the U-Net encoder, the rest the decoder."""
    L = cfg.num_layers
    if not looping or cfg.num_loops == 0:
        return list(range(L))
    seg = list(range(cfg.loop_start, cfg.loop_end + 1))
    return list(range(cfg.loop_start)) + seg * (cfg.num_loops + 1) + list(range(cfg.loop_end + 1, L))


# ----------------------------------------------------------------------------- small pieces


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim, eps = dtype machine epsilon (spec §3.2)."""
    return F.rms_norm(x, (x.size(-1),))


def bigram_hash(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) bucket ids (int64); int32 wrap-around arithmetic (spec §3.5)."""
    t = ids.to(torch.int32)
    mod = buckets - 1
    cur = BIGRAM_MUL_CUR * t[..., 1:]  # (B, T-1) int32, wraps like the reference
    prev = BIGRAM_MUL_PREV * t[..., :-1]  # (B, T-1)
    rest = torch.remainder(torch.bitwise_xor(cur, prev), mod)  # (B, T-1) in [0, mod)
    first = torch.full_like(t[..., :1], mod)  # (B, 1): the "no predecessor" bucket
    return torch.cat([first, rest], dim=-1).long()


class BigramHash(nn.Module):
    """scale * proj(table[hash(prev, cur)]): zero table, orthogonal projection, scale 0.05."""

    def __init__(self, buckets: int, dim: int, model_dim: int, proj_gain: float):
        super().__init__()
        self.buckets = buckets
        self.proj_gain = proj_gain
        self.embed = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.embed.weight)
        nn.init.orthogonal_(self.proj.weight)
        with torch.no_grad():
            self.proj.weight.mul_(self.proj_gain)
            self.scale.fill_(0.05)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(bigram_hash(ids, self.buckets))  # (B, T, bigram_dim)
        return self.scale * self.proj(e)  # (B, T, D)


class SmearGate(nn.Module):
    """out_t = (1 - g) * e_t + g * e_{t-1}, g = sigmoid(gate), e_{-1} = 0 (spec §3.6).

    With `bos_id` set (model.smear_bos_mask) g is 0 wherever ids_t == bos_id: a BOS keeps its own
    embedding, so the last token of one document never reaches the next one through the smear
    (the records' fix, PR #1851: mask the position whose current token is BOS)."""

    def __init__(self, dim: int, bos_id: int | None = None):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
        self.bos_id = bos_id

    def forward(self, e: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """e (B, T, D), ids (B, T) (needed only with a BOS mask) -> (B, T, D)."""
        g = torch.sigmoid(self.gate).to(e.dtype)  # (D,)
        prev = F.pad(e[:, :-1], (0, 0, 1, 0))  # (B, T, D): shifted right, zero at t=0
        if self.bos_id is None:
            return (1 - g) * e + g * prev
        keep = (ids != self.bos_id).unsqueeze(-1).to(e.dtype)  # (B, T, 1): 0 at a BOS
        gt = g * keep  # (B, T, D)
        return (1 - gt) * e + gt * prev


class AddSmearGate(nn.Module):
    """out_t = e_t + lam * sigmoid(gate . e_t[:window]) * e_{t-1}, out_0 = e_0 (PR #2135's form,
    model.smear_form add; applied to the raw embeddings, before their norm). gate (1, window) and
    lam (1,) start at 0, so the smear starts off. With `bos_id` set nothing is added at a BOS."""

    def __init__(self, window: int, bos_id: int | None = None):
        super().__init__()
        self.window = window
        self.gate = nn.Parameter(torch.zeros(1, window))
        self.lam = nn.Parameter(torch.zeros(1))
        self.bos_id = bos_id

    def forward(self, e: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """e (B, T, D), ids (B, T) (needed only with a BOS mask) -> (B, T, D)."""
        z = F.linear(e[:, 1:, :self.window], self.gate.to(e.dtype))  # (B, T-1, 1): gate of token t
        g = self.lam.to(e.dtype) * torch.sigmoid(z)  # (B, T-1, 1)
        if self.bos_id is not None:
            g = g * (ids[:, 1:] != self.bos_id).unsqueeze(-1).to(e.dtype)
        return torch.cat([e[:, :1], e[:, 1:] + g * e[:, :-1]], dim=1)


class ValueEmbedding(nn.Module):
    """Shared VE table: scale * proj(embed[ids]) -> (B, T, kv_dim) (spec §3.7)."""

    def __init__(self, vocab: int, dim: int, kv_dim: int, proj_gain: float = 1.0):
        super().__init__()
        self.proj_gain = proj_gain  # model.ve_proj_gain
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, kv_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.1))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, mean=0.0, std=0.01)
        nn.init.orthogonal_(self.proj.weight)
        with torch.no_grad():
            self.proj.weight.mul_(self.proj_gain)
            self.scale.fill_(0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.scale * self.proj(self.embed(ids))  # (B, T, kv_dim)


class Rotary(nn.Module):
    """Partial-RoPE tables for the first `rope_dims` of each head, with the NTK base rule (or,
    with `ntk` False, model.rope_ntk: false, one base at every length, as PR #2135).

    The tables up to `train_seq_len` are computed once (non-persistent buffers, so they follow
    `.to(device)` and stay out of checkpoints): a compiled graph then loads them instead of
    recomputing pow/cos/sin in every kernel that touches q or k (bench/results/PROFILE.md).
    Longer sequences (NTK-scaled base) compute their tables on the fly."""

    def __init__(self, rope_dims: int, base: float, train_seq_len: int, ntk: bool = True):
        super().__init__()
        self.rope_dims = rope_dims
        self.base = base
        self.train_seq_len = train_seq_len
        self.ntk = ntk
        cos, sin = self.tables(train_seq_len, torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)  # (train_seq_len, rd/2)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos, sin, each (T, rope_dims/2) fp32, computed now."""
        rd = self.rope_dims
        base = self.base
        if self.ntk and seq_len > self.train_seq_len:  # NTK-aware base scaling (spec §3.4)
            base = base * (seq_len / self.train_seq_len) ** (rd / (rd - 2))
        j = torch.arange(0, rd, 2, device=device, dtype=torch.float32)  # (rd/2,) = 2j
        inv_freq = 1.0 / (base ** (j / rd))  # (rd/2,)
        t = torch.arange(seq_len, device=device, dtype=torch.float32)  # (T,)
        freqs = torch.outer(t, inv_freq)  # (T, rd/2)
        return freqs.cos(), freqs.sin()

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos, sin, each (T, rope_dims/2) fp32: the stored tables' first T rows when they fit."""
        if seq_len <= self.train_seq_len and self.cos.device == device:
            return self.cos[:seq_len], self.sin[:seq_len]
        return self.tables(seq_len, device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd); rotate dims [0, rd): halves x1=[0, rd/2), x2=[rd/2, rd); rest passes."""
    half = cos.size(-1)
    rd = 2 * half
    c = cos.to(x.dtype)[None, :, None, :]  # (1, T, 1, rd/2)
    s = sin.to(x.dtype)[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:rd], x[..., rd:]
    return torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c, rest], dim=-1)


def norm_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              gain: torch.Tensor | None = None) -> torch.Tensor:
    """QK-norm over head_dim, partial RoPE, then the per-head gain (or none, for k):
    x (B, T, H, hd) -> (B, T, H, hd); cos/sin (T, rd/2). `fused_qk_norm_rope` is the same in one
    Triton kernel (train.fused_qk_norm_rope)."""
    x = rms_norm(x)
    if cos.size(-1) > 0:
        x = apply_rotary(x, cos, sin)
    return x if gain is None else x * gain.to(x.dtype)[None, None, :, None]


def xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exclusive self-attention: remove from each query head's output its own-position value dir.

    y (B, T, H, hd), v (B, T, Hkv, hd) -> (B, T, H, hd); query head h uses KV head h // (H/Hkv).
    """
    B, T, H, hd = y.shape
    hkv = v.size(2)
    yg = y.reshape(B, T, hkv, H // hkv, hd)  # (B, T, Hkv, group, hd)
    vn = F.normalize(v, dim=-1).unsqueeze(3)  # (B, T, Hkv, 1, hd)
    yg = yg - (yg * vn).sum(dim=-1, keepdim=True) * vn
    return yg.reshape(B, T, H, hd)


def softcap(z: torch.Tensor, cap_pos: float | torch.Tensor, cap_neg: float | torch.Tensor) -> torch.Tensor:
    """c * tanh(z / c) with c = cap_pos for z >= 0 and cap_neg for z < 0 (asymmetric, PR #1923);
    one tanh when two float caps are equal (the seeds' symmetric cap). Learned caps (0-d tensors,
    model.logit_softcap_learned) always take the two-sided form, cast to z's dtype."""
    if isinstance(cap_pos, torch.Tensor):
        cap_pos, cap_neg = cap_pos.to(z.dtype), cap_neg.to(z.dtype)
    elif cap_pos == cap_neg:
        return cap_pos * torch.tanh(z / cap_pos)
    return torch.where(z >= 0, cap_pos * torch.tanh(z / cap_pos), cap_neg * torch.tanh(z / cap_neg))


def gram_matrix(x2: torch.Tensor) -> torch.Tensor:
    """x2 (M, n) bf16/fp16 -> x2^T x2 (n, n) fp32, every product exact and every sum fp32: on a
    GPU one half-precision GEMM that accumulates and returns fp32 (torch.mm's out_dtype), else
    the inputs cast to fp32 first (a fifth of the time of an fp32 cast and a TF32 GEMM on a GPU:
    bench/results/capture_h200_machine6.json)."""
    if x2.is_cuda:
        return torch.mm(x2.t(), x2, out_dtype=torch.float32)
    x2 = x2.float()
    return x2.t() @ x2


def accumulate_gram(hessians: dict[str, torch.Tensor], names: tuple[str, ...], x: torch.Tensor) -> None:
    """hessians[name] += X^T X for each name, X the (M, n) rows that the matrices multiply: x
    (..., n) flattened and, under autocast, cast to the autocast dtype as F.linear casts it.

    (Autocast hands some inputs over in fp32, the outputs of rms_norm and of the MLP's square,
    and the layer multiplies them in bf16, so their gram is taken in bf16 too.)

    Every product is exact and every sum at least fp32, and the result is made exactly symmetric
    before the fp32 buffers take it (fp32 sums alone need not be, and the Hessian check tests
    symmetry). bf16/fp16 rows: `gram_matrix`; fp32 rows (no autocast, e.g. on a CPU) are
    multiplied in fp64, which TF32 would round."""
    dtype = _autocast_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x2 = x.detach().reshape(-1, x.size(-1)).to(dtype)  # (M, n)
        if x2.dtype in (torch.bfloat16, torch.float16):
            g = gram_matrix(x2)  # (n, n) fp32
        else:
            x2 = x2.double()
            g = x2.t() @ x2  # (n, n) fp64
        gram = ((g + g.t()) * 0.5).float()  # (n, n), gram == gram.T exactly
    for name in names:
        hessians[name].add_(gram)


# ----------------------------------------------------------------------------- attention / MLP


class CausalSelfAttention(nn.Module):
    """GQA attention on bank slices; owns only the per-head query gain."""

    def __init__(self, cfg: ModelConfig, use_xsa: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        self.use_xsa = use_xsa
        self.use_fused = False  # set by GPT.use_fused_qk
        self.backend = ATTN_BACKENDS[cfg.attn_backend]
        self.use_fa3 = HAS_FA3 and self.backend is None
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), float(cfg.qk_gain_init)))
        self.gate_window = cfg.attn_gate_window
        self.gate_scale = cfg.attn_gate_scale
        if self.gate_window > 0:  # sparse output gate (PR #1787): zero init, sigmoid(0) = 1/2
            self.gate_w = nn.Parameter(torch.zeros(cfg.num_heads, self.gate_window))
        else:
            self.gate_w = None

    def output_gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y_{t,h} * sigmoid(scale * gate_w[h] . x_t[:window]); x (B, T, D), y (B, T, H, hd)."""
        z = F.linear(x[..., :self.gate_window], self.gate_w.to(x.dtype))  # (B, T, H)
        g = torch.sigmoid(self.gate_scale * z).to(y.dtype)  # (B, T, H)
        return y * g[..., None]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention, q (B, T, H, hd), k/v (B, T, Hkv, hd) -> (B, T, H, hd)."""
        if self.use_fa3 and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            out = _fa3_func(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out  # some builds return (out, lse)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, hd)
        if self.backend is None or not q.is_cuda:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, hd)
            return y.transpose(1, 2)
        if self.backend != SDPBackend.FLASH_ATTENTION:  # cuDNN / efficient: K/V repeated to H heads
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        with sdpa_kernel(self.backend):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=self.backend == SDPBackend.FLASH_ATTENTION)
        return y.transpose(1, 2)

    def forward(self, x, w_q, w_k, w_v, w_o, cos, sin, ve=None, hessians=None, prefix="", docs=None, ad=None):
        """x (B, T, D) -> (B, T, D); ve (B, T, kvD) already scaled, or None. With `docs` (a
        pgolf.shared.docattn.DocSegments, B = 1) attention stays within its document segments.
        `ad` (per-row adapters of this layer slot, see `adapted`): q/k/v/o get ad.<site>(x) added."""
        B, T, _ = x.shape
        hd = self.head_dim
        if hessians is not None:
            accumulate_gram(hessians, tuple(f"{prefix}.attn.{n}.weight" for n in ("c_q", "c_k", "c_v")), x)
        q = adapted(F.linear(x, w_q), ad, "q", x).view(B, T, self.num_heads, hd)  # (B, T, H, hd)
        k = adapted(F.linear(x, w_k), ad, "k", x).view(B, T, self.num_kv_heads, hd)  # (B, T, Hkv, hd)
        v = adapted(F.linear(x, w_v), ad, "v", x)  # (B, T, kvD)
        if ve is not None:
            v = v + ve.to(v.dtype)
        v = v.view(B, T, self.num_kv_heads, hd)  # (B, T, Hkv, hd)
        if self.use_fused and q.is_cuda and not hd & (hd - 1):  # the kernel tiles a power-of-two hd
            from pgolf.shared.kernels.qk_norm_rope import fused_qk_norm_rope
            q, k = fused_qk_norm_rope(q, cos, sin, self.q_gain), fused_qk_norm_rope(k, cos, sin)
        else:
            q, k = norm_rope(q, cos, sin, self.q_gain), norm_rope(k, cos, sin)
        y = self._attend(q, k, v) if docs is None else docs.attend(q, k, v)  # (B, T, H, hd)
        if self.use_xsa:
            y = xsa(y, v.to(y.dtype))
        if self.gate_w is not None:
            y = self.output_gate(x, y)  # (B, T, H, hd)
        y = y.reshape(B, T, self.num_heads * hd)  # (B, T, D)
        if hessians is not None:
            accumulate_gram(hessians, (f"{prefix}.attn.proj.weight",), y)
        return adapted(F.linear(y, w_o), ad, "o", x)


def adapted(y: torch.Tensor, ad, site: str, x: torch.Tensor) -> torch.Tensor:
    """y + ad.<site>(x) when the adapters `ad` (pgolf.evaluate.phased: one layer slot's per-row
    LoRAs) have that site, else y unchanged; x (B, T, in), y (B, T, out)."""
    f = None if ad is None else getattr(ad, site, None)
    return y if f is None else y + f(x).to(y.dtype)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class MLP(nn.Module):
    """LeakyReLU(slope)^2 MLP on bank slices; no parameters of its own."""

    def __init__(self, slope: float):
        super().__init__()
        self.slope = slope
        self.use_fused = False  # set by GPT.use_fused_mlp

    def forward(self, x, w_up, w_down, hessians=None, prefix=""):
        """x (B, T, D) -> (B, T, D)."""
        if hessians is not None:
            accumulate_gram(hessians, (f"{prefix}.mlp.fc.weight",), x)
        elif self.use_fused and x.is_cuda:
            from pgolf.shared.kernels.fused_mlp import fused_leaky_relu_sq_mlp

            dt = _autocast_dtype(x)
            x2 = x.reshape(-1, x.size(-1)).to(dt)  # (B*T, D)
            y = fused_leaky_relu_sq_mlp(x2, w_up.to(dt), w_down.to(dt), self.slope)  # (B*T, D)
            return y.view_as(x)
        h = F.leaky_relu(F.linear(x, w_up), negative_slope=self.slope).square()  # (B, T, H)
        if hessians is not None:
            accumulate_gram(hessians, (f"{prefix}.mlp.proj.weight",), h)
        return F.linear(h, w_down)


class Block(nn.Module):
    """Pre-norm block with x0 residual mix and learned branch scales (spec §3.3)."""

    def __init__(self, cfg: ModelConfig, layer: int, use_xsa: bool):
        super().__init__()
        d = cfg.model_dim
        self.layer = layer
        # a tensor, not a float: torch.compile would bake a float into the graph, so that no two
        # blocks could share one compiled graph (train.compile_scope: blocks)
        self.register_buffer("ln_scale", torch.tensor(1.0 / math.sqrt(layer + 1)), persistent=False)  # ()
        self.attn = CausalSelfAttention(cfg, use_xsa)
        self.mlp = MLP(cfg.leaky_slope)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))  # (2, D)

    def _prefix(self, hessians) -> str:
        """The Hessians' name prefix; the layer index is read only when capturing, so the
        forward of a compiled block does not depend on it."""
        return f"blocks.{self.layer}" if hessians is not None else ""

    def _attn_branch(self, h_in, w, cos, sin, ve, hessians, docs=None, ad=None):
        """attn_scale * attention(rms_norm(h_in) * ln_scale) -> (B, T, D)."""
        a = rms_norm(h_in) * self.ln_scale
        attn = self.attn(a, *w[:4], cos, sin, ve=ve, hessians=hessians, prefix=self._prefix(hessians), docs=docs,
                         ad=ad)
        return self.attn_scale.to(h_in.dtype) * attn

    def _mlp_branch(self, h, w, hessians, ad=None):
        """mlp_scale * (MLP(m) [+ ad.mlp(m)]), m = rms_norm(h) * ln_scale -> (B, T, D)."""
        m = rms_norm(h) * self.ln_scale
        mlp = adapted(self.mlp(m, w[4], w[5], hessians=hessians, prefix=self._prefix(hessians)), ad, "mlp", m)
        return self.mlp_scale.to(h.dtype) * mlp

    def forward(self, h, x0, w, cos, sin, ve=None, hessians=None, docs=None, ad=None):
        """h, x0 (B, T, D); w = (w_q, w_k, w_v, w_o, w_up, w_down) -> (B, T, D)."""
        mix = self.resid_mix.to(h.dtype)
        h_in = mix[0] * h + mix[1] * x0
        h_mid = h_in + self._attn_branch(h_in, w, cos, sin, ve, hessians, docs, ad)
        return h_mid + self._mlp_branch(h_mid, w, hessians, ad)

    def parallel(self, lane0, lane1, x0, w, cos, sin, ve=None, hessians=None, docs=None, ad=None):
        """Two-lane block: attention reads lane0 (mixed with x0), the MLP reads lane1, side by
        side. lane0, lane1, x0 (B, T, D) -> (attn_out, mlp_out), each (B, T, D), branch-scaled."""
        mix = self.resid_mix.to(lane0.dtype)
        attn = self._attn_branch(mix[0] * lane0 + mix[1] * x0, w, cos, sin, ve, hessians, docs, ad)
        return attn, self._mlp_branch(lane1, w, hessians, ad)


# ----------------------------------------------------------------------------- the model


def use_fa4_kernels() -> None:
    """model.attn_backend fa4: aten's flash kernels, which SDPA's flash backend runs, from
    FlashAttention-4 (torch's flash registry; process-wide, CUDA only); ValueError when it cannot."""
    from pgolf.shared import docattn

    if not docattn.flash_impl_available("fa4", "cuda"):
        raise ValueError("model.attn_backend fa4: FlashAttention-4 cannot run here (needs the package "
                         "flash-attn-4, torch's flash registry and an SM 9.x/10.x GPU)")
    docattn.use_flash_impl("fa4")


class GPT(nn.Module):
    """The record model. `train_seq_len` only sets where the NTK RoPE rule starts (PR #1072: 2048)."""

    def __init__(self, cfg: ModelConfig, qat_quantile: float = 0.9995, train_seq_len: int = 2048):
        super().__init__()
        self.cfg = cfg  # checked where it was loaded (pgolf.config)
        L, D = cfg.num_layers, cfg.model_dim
        self.head_dim = D // cfg.num_heads
        self.kv_dim = cfg.num_kv_heads * self.head_dim
        self.hidden = cfg.mlp_hidden
        self.xsa_start = L - cfg.xsa_last_n
        self.ve_start = L - cfg.ve_last_n
        self.parallel_start = cfg.parallel_start_layer if cfg.parallel_start_layer > 0 else L  # L: off
        self.parallel_row0 = 0 if cfg.parallel_lambdas_all_layers else self.parallel_start  # layer of row 0
        self.head_hessian = False  # hessian_shapes also holds the tied head's input (train.hessian_head)
        self.set_qat_quantile(qat_quantile)

        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.bigram = (BigramHash(cfg.bigram_buckets, cfg.bigram_dim, D, cfg.bigram_proj_gain)
                       if cfg.bigram_buckets > 0 else None)
        bos = BOS_ID if cfg.smear_bos_mask else None
        self.smear = SmearGate(D, bos) if cfg.smear_form == "mix" else AddSmearGate(cfg.smear_window, bos)
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base, train_seq_len, ntk=cfg.rope_ntk)
        if cfg.ve_last_n > 0:
            self.ve_shared = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, self.kv_dim, cfg.ve_proj_gain)
            self.ve_layer_scales = nn.Parameter(torch.ones(cfg.ve_last_n))
        else:
            self.ve_shared = None
        n_looped = len(layer_order(cfg))  # the skips of the looped order (the longer one)
        self.skip_weights = nn.Parameter(torch.ones(min(n_looped // 2, n_looped - n_looped // 2), D))
        if cfg.skip_gates:  # sigmoid(0) = 1/2: each skip starts as the mean of the stream and w * skip
            self.skip_gates = nn.Parameter(torch.zeros_like(self.skip_weights))
        else:
            self.skip_gates = None
        self.looping = cfg.num_loops > 0  # depth recurrence on (the trainer may start it later)
        if self.parallel_start < L:  # row k is layer parallel_row0 + k: lane <- resid * lane + post . branches
            self.parallel_post = nn.Parameter(torch.ones(L - self.parallel_row0, 2, 2))
            self.parallel_resid = nn.Parameter(torch.full((L - self.parallel_row0, 2), PARALLEL_RESID_INIT))
        self.qo_bank = nn.Parameter(torch.empty(2 * L, D, D))  # Q in 0..L-1, O in L..2L-1
        self.kv_bank = nn.Parameter(torch.empty(2 * L, self.kv_dim, D))  # K in 0..L-1, V in L..2L-1
        self.mlp_up_bank = nn.Parameter(torch.empty(L, self.hidden, D))
        self.mlp_down_bank = nn.Parameter(torch.empty(L, D, self.hidden))
        self.blocks = nn.ModuleList(Block(cfg, i, use_xsa=i >= self.xsa_start) for i in range(L))
        if cfg.logit_softcap_learned:  # the eval head's caps, scalars (); the training loss keeps cfg's
            self.softcap_pos = nn.Parameter(torch.tensor(float(cfg.logit_softcap)))
            self.softcap_neg = nn.Parameter(torch.tensor(float(cfg.logit_softcap_neg)))
        self.qat_on = False  # late QAT: `qat_weights()` fake-quantizes the banks while this is set
        self.use_fused_mlp = False
        self.use_fused_qk = False
        self.use_fa3 = HAS_FA3 and cfg.attn_backend == "auto"
        if cfg.attn_backend == "fa4" and torch.cuda.is_available():
            use_fa4_kernels()
        self.reset_parameters()

    # -- init / flags

    def reset_parameters(self) -> None:
        """Spec §3.10: tied emb normal(0, std); Q, K, V, up orthogonal per slice; O, down zero."""
        L = self.cfg.num_layers
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)
        if self.bigram is not None:
            self.bigram.reset_parameters()
        if self.ve_shared is not None:
            self.ve_shared.reset_parameters()
        with torch.no_grad():
            for i in range(L):
                nn.init.orthogonal_(self.qo_bank[i])
                nn.init.orthogonal_(self.kv_bank[i])
                nn.init.orthogonal_(self.kv_bank[L + i])
                nn.init.orthogonal_(self.mlp_up_bank[i])
            self.qo_bank[L:].zero_()
            self.mlp_down_bank.zero_()
            for block in self.blocks:
                if block.attn.gate_w is not None:
                    block.attn.gate_w.zero_()
            if self.parallel_start < L:
                self.parallel_post.fill_(1.0)
                self.parallel_resid.fill_(PARALLEL_RESID_INIT)
            if self.skip_gates is not None:
                self.skip_gates.zero_()
            if self.cfg.logit_softcap_learned:
                self.softcap_pos.fill_(self.cfg.logit_softcap)
                self.softcap_neg.fill_(self.cfg.logit_softcap_neg)

    @property
    def use_fused_mlp(self) -> bool:
        return self._use_fused_mlp

    @use_fused_mlp.setter
    def use_fused_mlp(self, value: bool) -> None:
        self._use_fused_mlp = bool(value)
        for block in getattr(self, "blocks", []):
            block.mlp.use_fused = self._use_fused_mlp

    @property
    def use_fused_qk(self) -> bool:
        """q/k norm + RoPE + q gain in one Triton kernel on CUDA (`fused_qk_norm_rope`), where the
        head dim is a power of two; elsewhere the eager `norm_rope`."""
        return self._use_fused_qk

    @use_fused_qk.setter
    def use_fused_qk(self, value: bool) -> None:
        self._use_fused_qk = bool(value)
        for block in getattr(self, "blocks", []):
            block.attn.use_fused = self._use_fused_qk

    @property
    def use_fa3(self) -> bool:
        """FlashAttention-3 on CUDA bf16/fp16 when importable; False forces SDPA."""
        return self._use_fa3

    @use_fa3.setter
    def use_fa3(self, value: bool) -> None:
        if value and not HAS_FA3:
            raise ValueError("use_fa3=True but flash_attn_interface is not importable")
        self._use_fa3 = bool(value)
        for block in self.blocks:
            block.attn.use_fa3 = self._use_fa3

    def set_qat_quantile(self, quantile: float) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"train.qat_clip_quantile must be in (0, 1], got {quantile}")
        self.qat_quantile = float(quantile)

    def set_looping(self, enabled: bool) -> None:
        """Depth recurrence on/off (only with model.num_loops > 0); a compiled model recompiles once."""
        self.looping = bool(enabled) and self.cfg.num_loops > 0

    def set_qat(self, enabled: bool) -> None:
        """Late QAT on/off: from now on `qat_weights()` fake-quantizes the banks (or not)."""
        self.qat_on = bool(enabled)

    def _banks(self) -> list[nn.Parameter]:
        return [self.qo_bank, self.kv_bank, self.mlp_up_bank, self.mlp_down_bank]

    @contextmanager
    def qat_weights(self):
        """While QAT is on, the banks hold Q(w) inside the block and w again after it.

        Wrap one optimizer step's forwards and backwards (not the update): they see the int6
        fake-quantized weights and their gradients land on the banks unchanged, i.e. the
        straight-through estimator. A no-op while QAT is off."""
        if not self.qat_on:
            yield
            return
        qmax = qmax_for(QAT_BITS)
        with torch.no_grad():
            saved = [b.detach().clone() for b in self._banks()]
            for b in self._banks():
                b.copy_(fake_quant_values(b, self.qat_quantile, qmax))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, w in zip(self._banks(), saved):
                    b.copy_(w)

    # -- forward

    def forward_hidden(self, idx: torch.Tensor, hessians: dict[str, torch.Tensor] | None = None,
                       docs=None, lora=None) -> torch.Tensor:
        """idx (B, T) -> final normed hidden states (B, T, D). `docs` (train.doc_packing: a
        pgolf.shared.docattn.DocSegments of the one row, B = 1): attention within its segments,
        RoPE at the positions within them. `hessians`: the block matrices' input Grams accumulate
        there, and the output's (the tied head's input) when it holds HEAD_HESSIAN. `lora`
        (pgolf.evaluate.phased's per-row adapters): lora[pos] joins the layer at position pos of
        the layer order (each pass of a looped layer has its own)."""
        L = self.cfg.num_layers
        T = idx.size(1)
        # one view per matrix, by unbind: its backward stacks the slices' gradients into one bank
        # gradient, where indexing (qo[i]) gives each slice a zero-filled bank-sized gradient to
        # sum (in eager autograd: the CPU, and between the graphs of train.compile_scope: blocks)
        qo, kv, up, down = (bank.unbind(0) for bank in self._banks())
        x0 = self._front_end(idx)  # (B, T, D)
        if self.cfg.residual_dtype == "bf16":  # the whole residual stream in the autocast dtype
            x0 = x0.to(_autocast_dtype(x0))
        cos, sin = self.rotary(T, idx.device) if docs is None else docs.rope(self.rotary)  # (T, rd/2) each
        ve = self.ve_shared(idx) if self.ve_shared is not None else None  # (B, T, kvD)
        h = x0  # the stream; from model.parallel_start_layer on, lane 0 (lane1: lane 1)
        lane1 = None
        skips: list[torch.Tensor] = []
        order = layer_order(self.cfg, self.looping)
        n_enc = len(order) // 2
        for pos, i in enumerate(order):
            block = self.blocks[i]
            if lane1 is None and i >= self.parallel_start:
                lane1 = h  # both lanes start as the stream (before this layer's skip)
            j = pos - n_enc
            if j >= 0 and skips:
                h = self._skip(j, h, skips.pop())
            ve_i = self.ve_layer_scales[i - self.ve_start] * ve if i >= self.ve_start else None
            w = (qo[i], kv[i], kv[L + i], qo[L + i], up[i], down[i])
            ad = None if lora is None else lora[pos]
            if lane1 is None:
                h = block(h, x0, w, cos, sin, ve=ve_i, hessians=hessians, docs=docs, ad=ad)
            else:
                h, lane1 = self._parallel_layer(i, h, lane1, x0, w, cos, sin, ve_i, hessians, docs, ad)
            if pos < n_enc:
                skips.append(h)
        out = rms_norm(self._final_lane(h, lane1))  # (B, T, D)
        if hessians is not None and HEAD_HESSIAN in hessians:
            accumulate_gram(hessians, (HEAD_HESSIAN,), out)  # the rows the tied head multiplies
        return out

    def _front_end(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> x0 (B, T, D): token embeddings (+ BigramHash), then the SmearGate and the
        norm in model.smear_form's order (mix: norm, then smear; add: smear, then norm)."""
        e = self.tok_emb(idx)  # (B, T, D) fp32 (the tables are fp32)
        if self.bigram is not None:
            e = e + self.bigram(idx)
        if self.cfg.smear_form == "add":
            return rms_norm(self.smear(e, idx))
        return self.smear(rms_norm(e), idx)

    def _skip(self, j: int, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """U-Net skip j into the stream (lane 0 in the two-lane decoder), h, skip (B, T, D) -> (B, T, D):
        h + w_j * skip, or with model.skip_gates lerp(w_j * skip, h, sigmoid(g_j)), i.e.
        sigmoid(g_j) * h + (1 - sigmoid(g_j)) * w_j * skip."""
        scaled = self.skip_weights[j].to(h.dtype) * skip  # (B, T, D)
        if self.skip_gates is None:
            return h + scaled
        return torch.lerp(scaled, h, torch.sigmoid(self.skip_gates[j].to(h.dtype)))

    def _parallel_layer(self, i, lane0, lane1, x0, w, cos, sin, ve, hessians, docs=None, ad=None):
        """Both branches of block i on the two lanes; each lane keeps resid[k] of itself and adds
        post[k, branch, lane] of each branch (PR #1530's parallel residuals). -> (lane0, lane1)."""
        k = i - self.parallel_row0
        attn, mlp = self.blocks[i].parallel(lane0, lane1, x0, w, cos, sin, ve=ve, hessians=hessians, docs=docs, ad=ad)
        post = self.parallel_post[k].to(lane0.dtype)  # (2 branches, 2 lanes)
        res = self.parallel_resid[k].to(lane0.dtype)  # (2 lanes,)
        lane0_new = res[0] * lane0 + post[0, 0] * attn + post[1, 0] * mlp
        return lane0_new, res[1] * lane1 + post[0, 1] * attn + post[1, 1] * mlp

    def _final_lane(self, lane0: torch.Tensor, lane1: torch.Tensor | None) -> torch.Tensor:
        """The decoder output: the stream, or with two lanes their mean / one of them."""
        if lane1 is None:
            return lane0
        if self.cfg.parallel_final_lane == "attn":
            return lane0
        if self.cfg.parallel_final_lane == "mlp":
            return lane1
        return 0.5 * (lane0 + lane1)

    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> softcapped logits (B, T, V)."""
        return self.logits_from_hidden(self.forward_hidden(idx, None))

    def logits_from_hidden(self, h: torch.Tensor, lora=None) -> torch.Tensor:
        """h (..., D) -> softcapped tied-head logits (..., V), the scoring head (evaluation, TTT);
        lets callers score only some rows. Capped by the learned softcap_pos / softcap_neg with
        model.logit_softcap_learned, else by the fixed caps. `lora.head(h)` (per-row adapters of
        pgolf.evaluate.phased), when given, is added before the cap."""
        logits = adapted(F.linear(h, self.tok_emb.weight), lora, "head", h)  # (B, T, V), tied head
        if self.cfg.logit_softcap_learned:
            return softcap(logits, self.softcap_pos, self.softcap_neg)
        return softcap(logits, self.cfg.logit_softcap, self.cfg.logit_softcap_neg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor,
                hessians: dict[str, torch.Tensor] | None = None, docs=None) -> torch.Tensor:
        """idx, targets (B, T) -> mean CE (fp32 scalar); optionally accumulates Hessians; `docs`:
        a packed row's document segments (forward_hidden)."""
        if hessians is not None:
            self._check_hessians(hessians)
        return self.loss_from_hidden(self.forward_hidden(idx, hessians, docs), targets)

    def loss_from_hidden(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """h (B, T, D), targets (B, T) -> mean CE of the softcapped tied head (fp32 scalar): the
        training loss, always with the fixed caps (PR #2135 trains with its fixed cap; the learned
        ones of model.logit_softcap_learned only cap the scoring head, `logits_from_hidden`)."""
        logits = softcap(F.linear(h, self.tok_emb.weight), self.cfg.logit_softcap, self.cfg.logit_softcap_neg)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    # -- names, shapes, export

    def quantizable_names(self) -> list[str]:
        return [f"blocks.{i}.{k}.weight" for i in range(self.cfg.num_layers) for k in MATRIX_KINDS]

    def hessian_shapes(self) -> dict[str, int]:
        """name -> in_features of that matrix (its Hessian is (in, in)); with `head_hessian` also the
        tied head, HEAD_HESSIAN -> model_dim (its input: forward_hidden's output)."""
        d, hid = self.cfg.model_dim, self.hidden
        shapes = {n: (hid if n.endswith("mlp.proj.weight") else d) for n in self.quantizable_names()}
        return shapes | ({HEAD_HESSIAN: d} if self.head_hessian else {})

    def zero_hessians(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """A fresh fp32 zero Hessian per quantizable name, on `device` (default: the model's)."""
        device = device if device is not None else self.qo_bank.device
        return {n: torch.zeros(k, k, device=device) for n, k in self.hessian_shapes().items()}

    def _check_hessians(self, hessians: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.quantizable_names() if n not in hessians]
        if missing:
            raise ValueError(f"hessians dict lacks {len(missing)} quantizable name(s), e.g. {missing[0]}")

    def _bank_views(self) -> dict[str, torch.Tensor]:
        """Unbanked name -> the bank slice (a view) it corresponds to."""
        L = self.cfg.num_layers
        views = {}
        for i in range(L):
            views[f"blocks.{i}.attn.c_q.weight"] = self.qo_bank[i]
            views[f"blocks.{i}.attn.c_k.weight"] = self.kv_bank[i]
            views[f"blocks.{i}.attn.c_v.weight"] = self.kv_bank[L + i]
            views[f"blocks.{i}.attn.proj.weight"] = self.qo_bank[L + i]
            views[f"blocks.{i}.mlp.fc.weight"] = self.mlp_up_bank[i]
            views[f"blocks.{i}.mlp.proj.weight"] = self.mlp_down_bank[i]
        return views

    def _plain_params(self) -> dict[str, nn.Parameter]:
        banks = {"qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"}
        return {n: p for n, p in self.named_parameters() if n not in banks}

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Unbanked float state: per-layer matrix names + every other parameter by module name."""
        out = {n: v.detach().clone() for n, v in self._bank_views().items()}
        out.update({n: p.detach().clone() for n, p in self._plain_params().items()})
        return out

    def load_export_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load an `export_state_dict`-style dict back into banks and parameters (strict)."""
        targets = {**self._bank_views(), **self._plain_params()}
        missing = sorted(set(targets) - set(sd))
        unexpected = sorted(set(sd) - set(targets))
        if missing or unexpected:
            raise ValueError(f"model state mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, dst in targets.items():
            src = sd[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"model state: {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            if not src.is_floating_point():
                raise ValueError(f"model state: {name} must be a float tensor, got {src.dtype}")
        with torch.no_grad():
            for name, dst in targets.items():
                dst.copy_(sd[name])

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Muon matrices / AdamW embeddings / AdamW scalars (spec §4.2), and "untrained": the learned
        softcaps of model.logit_softcap_learned, which no training optimizer takes (PR #2135's
        Optimizers leave them out; the training loss does not read them). Every param exactly once.
        The small gates (SmearGate, skip gates, attention gates, lane lambdas) are scalars, as in #2135."""
        matrix = [self.qo_bank, self.kv_bank, self.mlp_up_bank, self.mlp_down_bank]
        embed = [self.tok_emb.weight]
        for extra in (self.bigram, self.ve_shared):
            if extra is not None:
                matrix.append(extra.proj.weight)
                embed.append(extra.embed.weight)
        untrained = [self.softcap_pos, self.softcap_neg] if self.cfg.logit_softcap_learned else []
        taken = {id(p) for p in matrix + embed + untrained}
        scalar = [p for p in self.parameters() if id(p) not in taken]
        return {"matrix": matrix, "embed": embed, "scalar": scalar, "untrained": untrained}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def count_params(cfg: ModelConfig) -> int:
    """Parameter count of GPT(cfg), built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return GPT(cfg).num_params()
