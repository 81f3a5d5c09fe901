"""Score-first test-time training (TTT): adapt the model on validation text it has already scored.

The validation targets are cut into chunks of `evaluate.ttt_chunk_tokens`; chunk after chunk,

    1. SCORE  every target of the chunk with the current weights (under `torch.inference_mode`,
              the same window rows as the plain evaluation: the sliding-window rows of pgolf.shared.bpb
              clipped at the chunk's edges, so each target keeps its context) -> these NLL and
              byte sums are the counted ones;
    2. ADAPT  on that chunk only (targets < its end, all already scored): `ttt_epochs` passes of
              sequences of `evaluate.context`, `ttt_batch_seqs` per optimizer step;
    3. move on. The last chunk is scored and then trained on for nothing, so it is skipped.

A target is therefore scored exactly once, causally, by weights that saw only earlier targets
(the challenge's condition, openai/parameter-golf issue #1017); tests/test_ttt.py checks it with
a model whose update is visible. Scores are cross-entropies over the full-vocabulary softmax.

What adapts (`ttt_mode`), on the block matrices of `ttt_targets` (kinds of
`pgolf.config.MATRIX_KINDS`) in layers >= `ttt_first_layer`:
  * "lora": W + B A with A (r, in) random, B (out, r) zero (so the start is the artifact's model);
  * "full": W + D with D (out, in) zero, i.e. the matrices themselves (weight decay pulls toward
    the artifact's W instead of 0).
Both are parametrizations of the model's weight banks (`torch.nn.utils.parametrize`), so the
unchanged GPT forward sees the adapted weights; everything else stays frozen, except, with
`ttt_asym_logit` (AsymLogit rescale, PR #2135), the model's learned softcap scalars
(`model.logit_softcap_learned`), which the scoring head and the adaptation loss both use.

Several ranks: the chunks are split contiguously, each rank adapts its own copy over its own
slice starting from the artifact's weights, and only the score sums are all-reduced at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from pgolf.shared import bpb
from pgolf.config import ConfigError, EvaluateConfig
from pgolf.shared.byte_tables import ByteTables
from pgolf.shared.dist import all_reduce_
from pgolf.shared.progress import track

# matrix kind -> (bank, which half): slice index = half * num_layers + layer (as GPT._bank_views)
BANK_SLOTS = {"attn.c_q": ("qo_bank", 0), "attn.proj": ("qo_bank", 1), "attn.c_k": ("kv_bank", 0),
              "attn.c_v": ("kv_bank", 1), "mlp.fc": ("mlp_up_bank", 0), "mlp.proj": ("mlp_down_bank", 0)}


# ----------------------------------------------------------------------------- chunks


def chunk_windows(windows: np.ndarray, chunk: int, num_targets: int) -> list[np.ndarray]:
    """Window rows (start, length, first_scored) split at multiples of `chunk` (target index).

    A row whose scored targets cross a chunk edge e becomes (start, e - start, first) and
    (start, length, e - start): the same inputs, causally truncated, so every target keeps its
    context. Returns one (n_c, 3) array per chunk; together they score each target once.
    """
    edges = np.arange(chunk, num_targets, chunk, dtype=np.int64)
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(len(edges) + 1)]
    for s, n, f in windows.tolist():
        lo = s + f  # first scored target
        while lo < s + n:
            c = lo // chunk
            hi = min(s + n, (c + 1) * chunk)
            out[c].append((s, hi - s, lo - s))
            lo = hi
    return [np.asarray(rows, dtype=np.int64).reshape(-1, 3) for rows in out]


def train_sequences(a: int, b: int, width: int) -> np.ndarray:
    """(n, 2) rows (start, length) covering targets [a, b) with sequences of at most `width`."""
    starts = np.arange(a, b, width, dtype=np.int64)
    return np.stack([starts, np.minimum(width, b - starts)], axis=1)


# ----------------------------------------------------------------------------- adapters


class BankDelta(nn.Module):
    """Parametrization bank (S, out, in) -> bank + delta on the slices `idx` (k,).

    lora: delta = B @ A, B (k, out, r) zero, A (k, r, in) ~ N(0, 1/in); full: delta = D (k, out, in) zero.
    """

    def __init__(self, shape: torch.Size, idx: list[int], mode: str, rank: int, gen: torch.Generator):
        super().__init__()
        _, out, inp = shape
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long), persistent=False)
        k = len(idx)
        if mode == "lora":
            self.A = nn.Parameter(torch.randn(k, rank, inp, generator=gen) / math.sqrt(inp))
            self.B = nn.Parameter(torch.zeros(k, out, rank))
            self.D = None
        else:
            self.A = self.B = None
            self.D = nn.Parameter(torch.zeros(k, out, inp))

    def forward(self, bank: torch.Tensor) -> torch.Tensor:
        delta = self.D if self.D is not None else torch.bmm(self.B, self.A)  # (k, out, in)
        return bank.index_add(0, self.idx, delta.to(bank.dtype))  # (S, out, in)


def attach(model, cfg: EvaluateConfig) -> list[nn.Parameter]:
    """Freeze `model`, parametrize the banks of the chosen matrices; returns the trainable tensors."""
    L = model.cfg.num_layers
    if cfg.ttt_first_layer >= L:
        raise ConfigError(f"evaluate.ttt_first_layer must be < the artifact model's {L} layers, "
                          f"got {cfg.ttt_first_layer}")
    for p in model.parameters():
        p.requires_grad_(False)
    slices: dict[str, list[int]] = {}
    for kind in cfg.ttt_targets:
        bank, half = BANK_SLOTS[kind]
        slices.setdefault(bank, []).extend(half * L + i for i in range(cfg.ttt_first_layer, L))
    gen = torch.Generator().manual_seed(cfg.ttt_seed)
    params = []
    for bank in sorted(slices):
        w = getattr(model, bank)
        delta = BankDelta(w.shape, sorted(slices[bank]), cfg.ttt_mode, cfg.ttt_rank, gen).to(w.device)
        parametrize.register_parametrization(model, bank, delta)
        params += [p for p in delta.parameters()]
    return params + _softcaps(model, cfg)


def _softcaps(model, cfg: EvaluateConfig) -> list[nn.Parameter]:
    """With evaluate.ttt_asym_logit, the model's learned softcap scalars (AsymLogit rescale): adapted
    with the adapters, score-first like them; [] otherwise."""
    if not cfg.ttt_asym_logit:
        return []
    if getattr(model, "softcap_pos", None) is None:
        raise ConfigError("evaluate.ttt_asym_logit needs an artifact model with learned softcaps "
                          "(model.logit_softcap_learned)")
    caps = [model.softcap_pos, model.softcap_neg]
    for p in caps:
        p.requires_grad_(True)
    return caps


def make_optimizer(params: list[nn.Parameter], cfg: EvaluateConfig) -> torch.optim.Optimizer:
    if cfg.ttt_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum, weight_decay=cfg.ttt_weight_decay)
    return torch.optim.AdamW(params, lr=cfg.ttt_lr, betas=(cfg.ttt_momentum, cfg.ttt_beta2),
                             weight_decay=cfg.ttt_weight_decay)


def lr_at(cfg: EvaluateConfig, i: int, n: int) -> float:
    """Learning rate for the i-th of a rank's n adapted chunks (cosine from ttt_lr toward 0, or constant)."""
    if cfg.ttt_lr_schedule == "constant" or n <= 1:
        return cfg.ttt_lr
    return cfg.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * i / n))


def adapt(model, tok: torch.Tensor, a: int, b: int, width: int, params: list[nn.Parameter],
          opt: torch.optim.Optimizer, cfg: EvaluateConfig, amp) -> float:
    """`ttt_epochs` passes over targets [a, b) (inputs tok[a:b], labels tok[a+1:b+1]); -> last batch loss."""
    seqs = torch.from_numpy(train_sequences(a, b, width)).to(tok.device)  # (n, 2)
    pos = torch.arange(width, device=tok.device)  # (width,)
    model.train()
    loss = torch.zeros(())
    for _ in range(cfg.ttt_epochs):
        for i in range(0, len(seqs), cfg.ttt_batch_seqs):
            start, length = seqs[i:i + cfg.ttt_batch_seqs].unbind(1)  # (B,), (B,)
            idx = start[:, None] + pos[None, :]  # (B, width)
            live = pos[None, :] < length[:, None]  # (B, width)
            x = torch.where(live, tok[idx.clamp(max=tok.numel() - 1)], 0)  # (B, width)
            y = torch.where(live, tok[(idx + 1).clamp(max=tok.numel() - 1)], -100)  # (B, width)
            with amp:
                logits = model.logits_from_hidden(model.forward_hidden(x))  # (B, width, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            opt.step()
    model.eval()
    return float(loss.detach())


# ----------------------------------------------------------------------------- the loop


@dataclass
class TTTResult:
    val_loss: float
    val_bpb: float
    scored_tokens: int
    scored_bytes: int
    chunks: int  # over all ranks
    trainable_params: int
    per_target: torch.Tensor | None = None  # (T,) float64 NLL per target of this rank (record=True)
    val_loss_untilted: float | None = None  # the same scores without the n-gram tilt
    val_bpb_untilted: float | None = None


def eval_ttt(model, tokens: np.ndarray, tables: ByteTables, cfg: EvaluateConfig, device, rank: int = 0,
             world: int = 1, progress: bool = False, record: bool = False, tilt=None) -> TTTResult:
    """Score-first TTT over every target of `tokens` (module docstring); sums all-reduced over ranks.
    `tilt` (pgolf.evaluate.ngram_tilt.Tilt): the scores are of the n-gram-tilted softmax (adaptation
    still trains on the plain cross-entropy, so the untilted scores beside them are those of a run
    without the tilt).

    Adapts `model` in place (parametrized banks): build it fresh from the artifact for anything else.
    `tables` is the byte counter (ByteTables, or a byte sidecar's pgolf.shared.val_bytes.SidecarBytes).
    """
    device = torch.device(device)
    tokens = np.asarray(tokens)
    bpb.check_vocab(model, tokens, tables)
    T = len(tokens) - 1
    windows = (bpb.sliding_windows(T, cfg.context, cfg.stride) if cfg.stride > 0
               else bpb.nonsliding_windows(T, cfg.context))
    chunks = chunk_windows(windows, cfg.ttt_chunk_tokens, T)
    lo, hi = len(chunks) * rank // world, len(chunks) * (rank + 1) // world
    params = attach(model, cfg)
    opt = make_optimizer(params, cfg)
    tok = torch.from_numpy(tokens.astype(np.int64)).to(device)  # (N,)
    tab = tables.to(device)
    tilt = None if tilt is None else tilt.to(device)
    fwd = bpb._hidden_fn(model, device, cfg.compile)
    amp = bpb.autocast_ctx(device)
    per_target = torch.zeros(T, dtype=torch.float64, device=device) if record else None
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # as bpb.local_sums
    steps = range(lo, hi)
    if progress and rank == 0:
        steps = track(steps, desc="ttt", unit="chunk")  # a bar on a TTY, else a line every 30 s
    for c in steps:
        win = torch.from_numpy(chunks[c]).to(device)  # (n_c, 3)
        sums += bpb.local_sums(model, tok, win, cfg.context, tab, cfg.batch_seqs, fwd, amp, per_target=per_target,
                               tilt=tilt)
        if c < len(chunks) - 1:  # the last chunk's update would score nothing
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, c - lo, hi - lo)
            a = c * cfg.ttt_chunk_tokens
            adapt(model, tok, a, min(T, a + cfg.ttt_chunk_tokens), cfg.context, params, opt, cfg, amp)
    all_reduce_(sums)
    nll, ntok, nbytes, _, plain = sums.tolist()
    sc = bpb.scores(nll, plain, ntok, nbytes)
    return TTTResult(sc["val_loss"], sc["val_bpb"], int(ntok), int(nbytes), len(chunks), sum(p.numel() for p in params),
                     per_target.cpu() if record else None, sc["val_loss_untilted"], sc["val_bpb_untilted"])
