"""Phased score-first TTT, per document (evaluate.ttt_scheme: phased; PR #2135's evaluation).

Documents: the validation stream cut before every BOS (and at 0). A document's targets are the
tokens after its first, up to and including the next document's BOS, so together the documents
score every target of the stream once, as the plain evaluation does.

Order: documents sorted by length (stable), in batches of `ttt_doc_batch`, the batch of the
longest first. Within a batch each document has its own LoRA adapters (`DocLoRA`, per row of
the batch) and the batch its own optimizer state; adapters start with B = 0, so a document's
first chunk is scored by the model alone. Then, chunk after chunk of `ttt_doc_chunk` targets:

    1. SCORE  the chunk's targets through a window of at most `evaluate.context` tokens of the
              same document ending at the chunk's end (no other document in view), with the
              model plus this document's adapters -> the counted NLL and bytes;
    2. TRAIN  one optimizer step of the adapters on the mean NLL of that chunk, already scored,
              for each document that has a later chunk.

A chunk step runs only the documents that have its chunk (the finished ones lead their batch and are
left out). With `ttt_compile` on CUDA it runs under torch.compile(dynamic=True), as PR #2135's does.

Phases: once the first `ttt_prefix_docs` documents in that order are scored (in `ttt_phases`
equal steps), a global pass trains every weight of the model (SGD with momentum, cosine over
chunks of `ttt_global_chunk_tokens`, sequences of `evaluate.context` with attention kept
within documents) on those scored documents, and the documents after it are scored by the
adapted model. Every target is therefore scored once, before any update that used it: a
document's adapters have seen only its earlier chunks, the global pass only documents already
scored. `tests/test_phased.py` checks both with models built to expose a leak.

Adapter sites (`ttt_sites`), as in PR #2135: q, k, v (added to the projections, on the
attention's normed input), o (added to the attention's output, from that same input), mlp (added
to the MLP's output, from its normed input) and head (added to the logits before the cap); output
scale `ttt_alpha / ttt_rank`; A ~ U(+-1/sqrt(in)) and, with `ttt_keep_a`, carried to the next
batch (only B resets). With `ttt_asym_logit` the learned softcaps train in the global pass, which
runs through the scoring head (PR #2135's runs through its fixed-cap training loss, so its caps
never move).

Several ranks: the batches are dealt round-robin; the global pass splits each chunk's sequences
over the ranks and averages their gradients, so each rank holds the same model after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F

from pgolf.config import EvaluateConfig
from pgolf.shared import bpb, docattn
from pgolf.shared.byte_tables import ByteTables
from pgolf.shared.dist import all_reduce_
from pgolf.shared.model import layer_order
from pgolf.shared.progress import Progress

# site -> (input width, output width) as functions of the model's (dim, kv_dim, vocab)
SITE_SHAPES = {"q": lambda d, kv, V: (d, d), "k": lambda d, kv, V: (d, kv), "v": lambda d, kv, V: (d, kv),
               "o": lambda d, kv, V: (d, d), "mlp": lambda d, kv, V: (d, d), "head": lambda d, kv, V: (d, V)}


# ----------------------------------------------------------------------------- documents


def documents(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """(n, 2) int64 rows (start, length): a document starts at 0 and at every BOS after 0 and runs
    through the next one's BOS (the last to the end), so its targets are tokens[start+1 : start+length]."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id)
    starts = np.union1d([0], starts).astype(np.int64)
    ends = np.append(starts[1:] + 1, len(tokens))
    keep = ends - starts >= 2  # a lone last token predicts nothing
    return np.stack([starts[keep], (ends - starts)[keep]], axis=1)


def batches(docs: np.ndarray, size: int) -> list[np.ndarray]:
    """Document indices sorted by length (stable) and cut into batches of `size`, in the order they
    run: the batch holding the longest document first (ties keep ascending order)."""
    order = np.argsort(docs[:, 1], kind="stable")
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    ranked = sorted(range(len(groups)), key=lambda g: -int(docs[groups[g], 1].max()))
    return [groups[g] for g in ranked]


def phase_ends(groups: list[np.ndarray], prefix_docs: int, phases: int) -> list[tuple[int, int]]:
    """For each global pass: (index of the batch after which it runs, documents it trains on).
    Pass k runs once prefix_docs * (k+1) / phases documents are scored (at least one batch); a
    pass after the last batch would score nothing and is dropped."""
    counts = np.cumsum([len(g) for g in groups])
    prefix = min(prefix_docs, int(counts[-1]) if len(counts) else 0)
    out = []
    for k in range(phases if prefix > 0 else 0):
        bound = max(1, prefix * (k + 1) // phases)
        out.append((int(np.searchsorted(counts, bound)), bound))
    return [(g, n) for g, n in out if g < len(groups) - 1]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def batch_chunks(rows: np.ndarray, chunk: int) -> int:
    """Chunk steps of a batch of documents `rows` (n, 2): those of its longest document."""
    return ceil_div(int(rows[:, 1].max()) - 1, chunk)


def done_rows(rows: np.ndarray, ci: int, chunk: int) -> int:
    """How many leading rows of `rows` (n, 2) have no chunk ci: chunk step ci leaves them out (a
    batch in `batches` order ascends in length, so every finished document leads)."""
    has = ceil_div(rows[:, 1] - 1, chunk) > ci  # (n,)
    return int(np.argmax(has))


def step_width(ci: int, chunk: int, context: int) -> int:
    """Window width of chunk step ci: every document's window fits (the longest ends at its chunk's end)."""
    return min(context, (ci + 1) * chunk)


# ----------------------------------------------------------------------------- adapters


class RowLoRA(nn.Module):
    """Per-row low-rank adapter: x (n, T, in) -> scale * x A_b^T B_b^T (n, T, out) with the last n
    of its rows (a chunk step leaves out the leading rows, whose documents are done: slicing by
    x's batch keeps the shapes symbolic under torch.compile); A (rows, r, in), B (rows, out, r) zero."""

    def __init__(self, rows: int, inp: int, out: int, rank: int, scale: float, gen: torch.Generator):
        super().__init__()
        self.bound, self.scale = 1.0 / math.sqrt(inp), scale
        self.A = nn.Parameter((torch.rand(rows, rank, inp, generator=gen) * 2 - 1) * self.bound)
        self.B = nn.Parameter(torch.zeros(rows, out, rank))

    def reset(self, keep_a: bool, gen: torch.Generator) -> None:
        with torch.no_grad():
            if not keep_a:
                self.A.copy_((torch.rand(self.A.shape, generator=gen) * 2 - 1) * self.bound)
            self.B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        h = torch.bmm(x, self.A[-n:].transpose(1, 2).to(x.dtype))  # (n, T, r)
        return torch.bmm(h, self.B[-n:].transpose(1, 2).to(x.dtype)) * self.scale  # (n, T, out)


class SlotLoRA(nn.Module):
    """One layer slot's adapters: attributes q, k, v, o, mlp (RowLoRA or None), as
    pgolf.shared.model.adapted reads them."""

    def __init__(self, sites: dict[str, nn.Module]):
        super().__init__()
        for name in ("q", "k", "v", "o", "mlp"):
            setattr(self, name, sites.get(name))


class DocLoRA(nn.Module):
    """Every slot's adapters for a batch of `rows` documents; lora[pos] is the slot at position pos
    of the layer order, lora.head the head's (or None)."""

    def __init__(self, model, rows: int, cfg: EvaluateConfig, gen: torch.Generator):
        super().__init__()
        mc = model.cfg
        dims = (mc.model_dim, mc.num_kv_heads * (mc.model_dim // mc.num_heads), mc.vocab_size)
        scale = cfg.ttt_alpha / cfg.ttt_rank

        def make(site):
            return RowLoRA(rows, *SITE_SHAPES[site](*dims), cfg.ttt_rank, scale, gen)

        slots = len(layer_order(mc, model.looping))
        body = [s for s in cfg.ttt_sites if s != "head"]
        self.slots = nn.ModuleList([SlotLoRA({s: make(s) for s in body}) for _ in range(slots)])
        self.head = make("head") if "head" in cfg.ttt_sites else None
        self.rows = rows

    def __getitem__(self, pos: int) -> SlotLoRA:
        return self.slots[pos]

    def reset(self, keep_a: bool, gen: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, RowLoRA):
                m.reset(keep_a, gen)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.parameters(), saved):
                p.copy_(s)


def make_adapter_optimizer(params, cfg: EvaluateConfig) -> torch.optim.Optimizer:
    """PR #2135: AdamW(beta1 = ttt_momentum, beta2, eps 1e-10) or SGD with momentum."""
    if cfg.ttt_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum, weight_decay=cfg.ttt_weight_decay)
    return torch.optim.AdamW(params, lr=cfg.ttt_lr, betas=(cfg.ttt_momentum, cfg.ttt_beta2), eps=1e-10,
                             weight_decay=cfg.ttt_weight_decay, fused=params[0].is_cuda)


# ----------------------------------------------------------------------------- one batch


@dataclass
class ChunkRows:
    """One chunk step of a batch: inputs x (B, W), the counted targets' window positions pos
    (B, k), their token ids tgt (B, k), the tokens before them prev (B, k), their stream positions
    at (B, k), live (B, k) and train (B,); trains: any row trains (known on the host). Rows without
    a live target at a column hold pos 0 and at 1 there."""

    x: torch.Tensor
    pos: torch.Tensor
    tgt: torch.Tensor
    prev: torch.Tensor
    at: torch.Tensor
    live: torch.Tensor
    train: torch.Tensor
    trains: bool


def chunk_rows(tok: torch.Tensor, rows: torch.Tensor, ci: int, chunk: int, context: int, trains: bool) -> ChunkRows:
    """Chunk step ci of the documents `rows` (n, 2) (start, length) on tok's device, built there
    (no host copy, no sync: the step's kernels queue behind the last). A document's window ends at
    its chunk's end (its last target for its last chunk) and is at most `context` tokens long; a
    document without chunk ci has no live targets. `trains`: whether any row has a later chunk."""
    start, n_pred = rows[:, 0], rows[:, 1] - 1  # (n,)
    n_chunks = (n_pred + chunk - 1) // chunk
    end = torch.where(n_chunks == ci + 1, n_pred, (ci + 1) * chunk)  # (n,) the window's end
    ws = (end - context).clamp(min=0)
    col = torch.arange(step_width(ci, chunk, context), device=tok.device)  # (W,)
    inside = (col < (end - ws)[:, None]) & (n_chunks > ci)[:, None]  # (n, W)
    x = torch.where(inside, tok[(start + ws)[:, None] + col * inside], 0)  # (n, W)
    j = torch.arange(chunk, device=tok.device)  # (k,)
    live = j < (n_pred - ci * chunk)[:, None]  # (n, k)
    pos = torch.where(live, (ci * chunk - ws)[:, None] + j, 0)
    at = torch.where(live, start[:, None] + ci * chunk + 1 + j, 1)  # the targets' stream positions
    return ChunkRows(x, pos, tok[at], tok[at - 1], at, live, n_chunks > ci + 1, trains)


def run_batch(model, lora: DocLoRA, opt, tok: torch.Tensor, rows: np.ndarray, cfg: EvaluateConfig, tab,
              amp, tilt=None, per_target: torch.Tensor | None = None) -> torch.Tensor:
    """Score, then train on, every chunk of the documents `rows`; -> float64 sums (nll, tokens, bytes,
    untilted nll)."""
    forward = chunk_forward(cfg, tok.device)
    on_dev = torch.from_numpy(rows).to(tok.device)  # (n, 2), once per batch
    left = ceil_div(rows[:, 1] - 1, cfg.ttt_doc_chunk)  # (n,) chunks of each document
    sums = torch.zeros(4, dtype=torch.float64, device=tok.device)
    for ci in range(batch_chunks(rows, cfg.ttt_doc_chunk)):
        d = done_rows(rows, ci, cfg.ttt_doc_chunk)
        c = chunk_rows(tok, on_dev[d:], ci, cfg.ttt_doc_chunk, cfg.context, bool((left > ci + 1).any()))
        with torch.enable_grad(), amp:  # also on a batch's last step: one grad mode, one compiled graph
            logits = forward(model, lora, c.x, c.pos)  # (B, k, V)
        nll = F.cross_entropy(logits.transpose(1, 2), c.tgt, reduction="none")  # (B, k)
        sums += _score(logits, nll, c, tab, tilt, per_target)
        if c.trains:
            per_doc = (nll * c.live).sum(1) / c.live.sum(1).clamp(min=1)  # (B,)
            opt.zero_grad(set_to_none=True)
            (per_doc * c.train).sum().backward()
            opt.step()
    return sums


def chunk_logits(model, lora: DocLoRA, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Inputs x (B, W) -> float logits (B, k, V) at the window positions pos (B, k), with the last B
    rows of `lora`."""
    h = model.forward_hidden(x, lora=lora)  # (B, W, D)
    h = torch.gather(h, 1, pos[..., None].expand(-1, -1, h.size(-1)))  # (B, k, D)
    return model.logits_from_hidden(h, lora=lora).float()  # (B, k, V)


_COMPILED: list = []  # chunk_logits under torch.compile, built once per process


def chunk_forward(cfg: EvaluateConfig, device):
    """chunk_logits, or with evaluate.ttt_compile on CUDA `compiled_chunk_logits`."""
    if not (cfg.ttt_compile and torch.device(device).type == "cuda"):
        return chunk_logits
    if not _COMPILED:
        _COMPILED.append(torch.compile(chunk_logits, dynamic=True))
    return compiled_chunk_logits


def compiled_chunk_logits(model, lora: DocLoRA, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """chunk_logits under torch.compile(dynamic=True), one graph for every chunk step of a run: the
    row count is unbacked (no graph of its own for one row), duck sizing is off (a first step's
    window is as wide as its chunk, which would tie the two sizes), and a short batch uses the last
    rows of the batch adapters (the same parameter shapes)."""
    torch._dynamo.decorators.mark_unbacked(x, 0)
    torch._dynamo.decorators.mark_unbacked(pos, 0)
    with fx_config.patch(use_duck_shape=False):
        return _COMPILED[0](model, lora, x, pos)


def _score(logits, nll, c: ChunkRows, tab, tilt, per_target) -> torch.Tensor:
    """(nll, tokens, bytes, untilted nll) of the live targets of one chunk step (n-gram tilted with
    `tilt`), every row computed and the dead ones weighted 0 (a boolean index would sync with the
    host). The adapters train on the untilted nll, so its sum is the score of a run without the tilt."""
    with torch.no_grad():
        live = c.live.reshape(-1)  # (B*k,)
        at = c.at.reshape(-1)  # (B*k,) stream positions of the targets (1 where dead)
        plain = torch.where(live, nll.detach().reshape(-1).double(), 0.0)  # (B*k,)
        got = plain
        if tilt is not None:
            rows = tilt.apply(logits.detach().reshape(-1, logits.size(-1)), at - 1)  # (B*k, V)
            got = torch.where(live, F.cross_entropy(rows, c.tgt.reshape(-1), reduction="none").double(), 0.0)
        if per_target is not None:
            per_target.index_add_(0, at - 1, got)
        nbytes = tab.count(c.prev.reshape(-1), c.tgt.reshape(-1), at) * live
        return torch.stack([got.sum(), live.sum().double(), nbytes.double().sum(), plain.sum()])


# ----------------------------------------------------------------------------- the global pass


def global_pass(model, tok: torch.Tensor, docs: np.ndarray, cfg: EvaluateConfig, amp, rank: int = 0,
                world: int = 1, backend: str = "auto") -> int:
    """SGD (momentum) on every weight of `model` over the documents `docs` (n, 2), all scored:
    their tokens end to end, in chunks of ttt_global_chunk_tokens (the last one skipped, as PR
    #2135), each cut into sequences of evaluate.context, ttt_global_batch_seqs per step as one
    packed row with attention within documents; lr cosine over the chunks; gradients averaged
    over ranks. -> optimizer steps taken."""
    stream = torch.cat([tok[s:s + n] for s, n in docs.tolist()])  # (N,)
    L, C = cfg.context, cfg.ttt_global_chunk_tokens
    n_chunks = ceil_div(len(stream) - 1, C)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.ttt_global_lr, momentum=cfg.ttt_global_momentum)
    backend = docattn.resolve(backend, tok.device)
    steps = 0
    for ci in range(n_chunks - 1):
        lr = cfg.ttt_global_lr * 0.5 * (1.0 + math.cos(math.pi * ci / max(n_chunks - 1, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        a = ci * C
        seqs = (min(a + C, len(stream) - 1) - a) // L
        lo, hi = seqs * rank // world, seqs * (rank + 1) // world
        B = cfg.ttt_global_batch_seqs
        n_steps = ceil_div(ceil_div(seqs, world), B)  # the same on every rank (collectives pair up)
        for _ in range(cfg.ttt_global_epochs):
            for i in range(n_steps):
                s, e = min(lo + i * B, hi), min(lo + (i + 1) * B, hi)  # s == e: this rank has none left
                row = stream[a + s * L:a + e * L + 1] if e > s else None  # (n + 1,)
                _global_step(model, row, L, backend, params, opt, cfg, amp, world)
                steps += 1
    return steps


def _global_step(model, row, L, backend, params, opt, cfg: EvaluateConfig, amp, world: int) -> None:
    """One step on a packed row (n + 1,) of whole sequences of L (None: no sequences on this rank,
    zero gradients): loss of the scoring head, gradients summed over ranks / world (PR #2135)."""
    opt.zero_grad(set_to_none=False)
    if row is not None:
        x, y = row[:-1][None], row[1:][None]  # (1, n)
        docs = docattn.segments_of_row(x, L, backend, x.device)
        model.train()
        with amp:
            logits = model.logits_from_hidden(model.forward_hidden(x, docs=docs))  # (1, n, V)
        F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
        model.eval()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        for p in params:
            all_reduce_(p.grad).div_(world)
    if cfg.ttt_global_grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.ttt_global_grad_clip)
    opt.step()
    model.eval()


# ----------------------------------------------------------------------------- the loop


@dataclass
class PhasedResult:
    val_loss: float
    val_bpb: float
    scored_tokens: int
    scored_bytes: int
    chunks: int  # chunk steps over all batches of this rank
    trainable_params: int  # adapters of one full batch
    docs: int
    global_steps: int
    per_target: torch.Tensor | None = None  # (T,) float64 NLL per target of this rank (record=True)
    val_loss_untilted: float | None = None  # the same scores without the n-gram tilt
    val_bpb_untilted: float | None = None


def eval_phased(model, tokens: np.ndarray, tables: ByteTables, cfg: EvaluateConfig, device, rank: int = 0,
                world: int = 1, progress: bool = False, record: bool = False, tilt=None,
                bos_id: int | None = None) -> PhasedResult:
    """Phased per-document score-first TTT over every target of `tokens` (module docstring); sums
    all-reduced over ranks. Adapts `model` in place (the global pass): build it fresh for anything else."""
    if bos_id is None:
        from pgolf.shared.shards import BOS_ID as bos_id
    device = torch.device(device)
    tokens = np.asarray(tokens)
    bpb.check_vocab(model, tokens, tables)
    docs = documents(tokens, bos_id)
    groups = batches(docs, cfg.ttt_doc_batch)
    passes = phase_ends(groups, cfg.ttt_prefix_docs, cfg.ttt_phases)
    tok = torch.from_numpy(tokens.astype(np.int64)).to(device)  # (N,)
    tab = tables.to(device)
    tilt = None if tilt is None else tilt.to(device)
    amp = bpb.autocast_ctx(device)
    gen = torch.Generator().manual_seed(cfg.ttt_seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lora = DocLoRA(model, cfg.ttt_doc_batch, cfg, gen).to(device)
    per_target = torch.zeros(len(tokens) - 1, dtype=torch.float64, device=device) if record else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nll, tokens, bytes, untilted nll
    chunks = global_steps = 0
    mine = [g for g in range(len(groups)) if g % world == rank]
    # counted in targets, not batches: the longest documents run first, so batches take ever less time
    targets = {g: _targets(docs, groups[g]) for g in mine}
    bar = Progress("ttt", "target", sum(targets.values())) if progress and rank == 0 else None
    done = 0  # global passes run
    for g in mine:
        while done < len(passes) and g > passes[done][0]:
            global_steps += _run_pass(model, tok, docs, groups, passes[done], cfg, amp, rank, world)
            lora = DocLoRA(model, cfg.ttt_doc_batch, cfg, gen).to(device)
            done += 1
        rows = docs[groups[g]]
        short = len(rows) < lora.rows  # fresh adapters on the last rows; the carried ones come back after
        carried = lora.snapshot() if short else None
        lora.reset(cfg.ttt_keep_a and not short, gen)
        opt = make_adapter_optimizer(list(lora.parameters()), cfg)
        sums += run_batch(model, lora, opt, tok, rows, cfg, tab, amp, tilt, per_target)
        if short:
            lora.restore(carried)
        chunks += batch_chunks(rows, cfg.ttt_doc_chunk)
        if bar is not None:
            bar.update(targets[g])
    while done < len(passes):  # passes after this rank's last batch (collective under several ranks)
        global_steps += _run_pass(model, tok, docs, groups, passes[done], cfg, amp, rank, world)
        done += 1
    if bar is not None:
        bar.close()
    all_reduce_(sums)
    nll, ntok, nbytes, plain = sums.tolist()
    sc = bpb.scores(nll, plain, ntok, nbytes)
    return PhasedResult(sc["val_loss"], sc["val_bpb"], int(ntok), int(nbytes), chunks,
                        sum(p.numel() for p in lora.parameters()), len(docs), global_steps,
                        per_target.cpu() if record else None, sc["val_loss_untilted"], sc["val_bpb_untilted"])


def _targets(docs: np.ndarray, group: np.ndarray) -> int:
    """The targets the documents `group` score: each document's length less its first token."""
    return int(docs[group, 1].sum()) - len(group)


def _run_pass(model, tok, docs, groups, end: tuple[int, int], cfg: EvaluateConfig, amp, rank, world) -> int:
    """The global pass after batch end[0], on the first end[1] scored documents in PR #2135's
    order (ascending length, then index: its batches' original order, then position in them)."""
    last, count = end
    scored = np.concatenate(groups[:last + 1])
    scored = scored[np.lexsort((scored, docs[scored, 1]))][:count]
    caps = {id(getattr(model, n, None)) for n in ("softcap_pos", "softcap_neg")}
    for p in model.parameters():
        p.requires_grad_(cfg.ttt_asym_logit or id(p) not in caps)
    try:
        return global_pass(model, tok, docs[scored], cfg, amp, rank, world)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
