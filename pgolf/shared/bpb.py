"""val_bpb: validation tokens, the window sets, and batched scoring of a GPT (recipe-spec §2).

This module owns how a model is scored. Both evaluations reduce to one primitive: a set of
windows over the token stream, each `(start, length, first_scored)`; a window feeds
`tokens[start : start+length]` (zero-padded to a fixed width), and scores the targets at window
positions `[first_scored, length)`, i.e. target `tokens[start+p+1]` with context
`tokens[start : start+p+1]` and byte credit `ByteTables.count(prev=tokens[start+p], tgt)`, or, where
prepare wrote a byte sidecar (pgolf.shared.val_bytes), the sidecar's entry of the target, its original bytes.
Every function taking `tables` takes either counter.

- non-sliding (§2.3): tokens truncated to `((N-1)//L)*L + 1` (§2.2), windows of L, all scored;
- sliding (§2.4): the first window scores all its targets, every later one its last `stride`.
  Unlike the reference scripts there is no tail duplication: only the windows needed are kept,
  and the last one ends at the last target and scores exactly the targets still unscored, so
  every target is scored once (the reference re-scores up to context-stride tail targets,
  a ~1e-5 bpb difference).

With `doc_backend` (a model trained with train.doc_packing) a batch of non-sliding windows is laid end
to end as one row of the stream whose attention stays within documents, as the model was trained
and as PR #2135's `eval_val` scores: a segment starts at the row's start, at every BOS and every
`width` tokens from a document's start (`row_segments`).

Only the scored rows go through the tied head (`model.logits_from_hidden` on the gathered
hidden rows). NLL, token and byte sums are float64 and summed across ranks (windows are split
contiguously); val_bpb = sum NLL / (ln 2 * sum bytes). On CUDA the forward runs under bf16
autocast and `torch.compile(dynamic=False)` with every batch padded to the same shape.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.shared.byte_tables import ByteTables

from pgolf.shared.shards import list_shards, load_tokens
from pgolf.shared.dist import all_reduce_
from pgolf.shared.progress import track

_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def load_val_tokens(shard_dir: str | Path, max_tokens: int = 0) -> np.ndarray:
    """All `fineweb_val_*.bin` of `shard_dir` concatenated (uint16); max_tokens > 0 keeps the
    first max_tokens + 1 tokens (= max_tokens targets)."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    tokens = load_tokens(list_shards(shard_dir, "val"))
    if max_tokens > 0:
        tokens = tokens[:max_tokens + 1]
    if tokens.size < 2:
        raise ValueError(f"{shard_dir}: only {tokens.size} validation token(s); need at least 2")
    return tokens


def truncate(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Spec §2.2: keep ((N-1)//seq_len)*seq_len + 1 tokens (whole sequences of targets)."""
    n = (len(tokens) - 1) // seq_len * seq_len + 1
    if n < seq_len + 1:
        raise ValueError(f"{len(tokens)} validation tokens are fewer than one sequence of {seq_len} + 1")
    return tokens[:n]


# ----------------------------------------------------------------------------- window sets


def nonsliding_windows(num_targets: int, seq_len: int) -> np.ndarray:
    """(n, 3) int64 rows (start, length, first_scored): back-to-back sequences, all scored."""
    n = num_targets // seq_len
    starts = np.arange(n, dtype=np.int64) * seq_len
    return np.stack([starts, np.full(n, seq_len), np.zeros(n, dtype=np.int64)], axis=1)


def sliding_windows(num_targets: int, context: int, stride: int) -> np.ndarray:
    """(n, 3) int64 rows (start, length, first_scored) covering targets [0, num_targets) once.

    Window 0 = [0, min(context, T)) scores everything; window k >= 1 is the full window ending at
    context + k*stride (scores its last `stride`); if T - context is not a multiple of stride, one
    last full-width window ends at T and scores the r < stride targets left over.
    """
    if context <= 0 or not 0 < stride <= context:
        raise ValueError(f"need 0 < stride <= context, got context {context}, stride {stride}")
    T = num_targets
    first = min(context, T)
    k = (T - first) // stride  # full-stride windows after the first
    ends = first + stride * np.arange(1, k + 1, dtype=np.int64)
    rows = [np.array([[0, first, 0]], dtype=np.int64),
            np.stack([ends - context, np.full(k, context), np.full(k, context - stride)], axis=1)]
    r = T - first - k * stride
    if r > 0:
        rows.append(np.array([[T - context, context, context - r]], dtype=np.int64))
    return np.concatenate(rows).astype(np.int64)


def scored_positions(windows: np.ndarray) -> np.ndarray:
    """Sorted target indices scored by a window set (with repeats if any); for tests/checks."""
    return np.sort(np.concatenate([np.arange(s + f, s + n) for s, n, f in windows]))


# ----------------------------------------------------------------------------- scoring


def _hidden_fn(model, device: torch.device, compile: bool):
    """model.forward_hidden, compiled once per model on CUDA (fixed shapes, dynamic=False)."""
    if not (compile and device.type == "cuda"):
        return model.forward_hidden
    fn = _COMPILED.get(model)
    if fn is None:
        fn = torch.compile(model.forward_hidden, dynamic=False)
        _COMPILED[model] = fn
    return fn


def warm_up(model, width: int, batch_seqs: int, device, compile: bool, doc_backend: str | None = None) -> float:
    """Seconds to compile (and run once) the scoring forward on a zero batch (batch_seqs, width)
    (with `doc_backend`: as one row within documents), so that the timed passes after it exclude
    the one-time compile; 0.0 where nothing compiles."""
    device = torch.device(device)
    if not (compile and device.type == "cuda"):
        return 0.0
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    x = torch.zeros(batch_seqs, width, dtype=torch.long, device=device)  # (B, width)
    with torch.inference_mode(), autocast_ctx(device):
        if doc_backend is None:
            _hidden_fn(model, device, True)(x)
        else:
            from pgolf.shared import docattn  # only where a doc-packed model is scored
            docs = docattn.segments_of_row(x.reshape(-1), width, doc_backend, device)
            _hidden_fn(model, device, True)(x.reshape(1, -1), docs=docs)
    torch.cuda.synchronize(device)
    model.train(was_training)
    return round(time.perf_counter() - t0, 3)


def _batch(tok: torch.Tensor, win: torch.Tensor, width: int):
    """Inputs and scored-row indices of a batch of windows.

    tok (N,) int64 on device; win (B, 3) -> x (B, width) zero-padded inputs, rows_b/rows_p (M,)
    window and position of every scored target, tgt/prev (M,) the target and previous tokens.
    """
    start, length, first = win[:, 0], win[:, 1], win[:, 2]
    pos = torch.arange(width, device=tok.device)  # (width,)
    idx = start[:, None] + pos[None, :]  # (B, width)
    live = pos[None, :] < length[:, None]  # (B, width)
    x = torch.where(live, tok[idx.clamp(max=tok.numel() - 1)], 0)  # (B, width)
    scored = live & (pos[None, :] >= first[:, None])  # (B, width)
    rows_b, rows_p = scored.nonzero(as_tuple=True)  # (M,), (M,)
    tgt = tok[idx[rows_b, rows_p] + 1]  # (M,)
    prev = x[rows_b, rows_p]  # (M,)
    return x, rows_b, rows_p, tgt, prev


def row_segments(x: torch.Tensor, win: torch.Tensor, width: int, backend: str):
    """The DocSegments of a batch's inputs x (B, width) laid end to end as one row (B*width,), for
    windows `win` (b, 3), b <= B, that continue one another (non-sliding), so the row is the token
    stream: a segment starts at the row's start, at every BOS and every `width` tokens from a
    document's start. Rows past b (shape padding) come after every scored position. ValueError for
    windows that do not continue one another: the model's front end (BigramHash, SmearGate) would
    read the wrong previous token at their seams."""
    from pgolf.shared import docattn  # only where a doc-packed model is scored

    start, length = win[:, 0].cpu().numpy(), win[:, 1].cpu().numpy()  # (b,), (b,)
    if not (np.all(start[1:] == start[:-1] + width) and np.all(length[:-1] == width)):
        raise ValueError("scoring within documents needs non-sliding windows (each continuing the one before)")
    return docattn.segments_of_row(x.reshape(-1), width, backend, x.device)  # the row (B*width,)


def check_vocab(model, tokens: np.ndarray, tables: ByteTables) -> None:
    """ValueError when a token id is outside the model's or the byte tables' vocabulary."""
    if int(tokens.max()) >= tables.vocab_size or int(tokens.max()) >= model.cfg.vocab_size:
        raise ValueError(f"validation token id {int(tokens.max())} outside the vocabulary "
                         f"(model {model.cfg.vocab_size}, byte tables {tables.vocab_size})")


def autocast_ctx(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


def local_sums(model, tok: torch.Tensor, windows: torch.Tensor, width: int, tab: ByteTables, batch_seqs: int,
               fwd, amp, progress: bool = False, per_target: torch.Tensor | None = None, tilt=None,
               doc_backend: str | None = None) -> torch.Tensor:
    """This process's float64 sums (nll, tokens, bytes, windows, untilted nll) over `windows` (n, 3),
    no all-reduce.

    tok (N,) int64 and `tab` on the model's device; `fwd` the hidden-state function; `per_target`
    (N-1,) float64, when given, gets every scored target's NLL added at its target index (checks).
    `tilt` (pgolf.evaluate.ngram_tilt.Tilt on the device), when given, turns each scored row into
    log_softmax(logits + boost * onehot(hint of its target)) before the NLL; the last sum is the
    NLL of the same rows without it (= the first without a tilt). `doc_backend`: each batch as one
    row with attention within documents (`row_segments`).
    """
    sums = torch.zeros(5, dtype=torch.float64, device=tok.device)  # nll, tokens, bytes, windows, untilted nll
    steps = range(0, len(windows), batch_seqs)
    if progress:
        steps = track(steps, desc="eval", unit="batch")  # a bar on a TTY, else a line every 30 s
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in steps:
            win = windows[i:i + batch_seqs]  # (b, 3)
            x, rows_b, rows_p, tgt, prev = _batch(tok, win, width)
            if len(win) < batch_seqs:  # keep one shape for the compiled graph
                x = torch.cat([x, x.new_zeros(batch_seqs - len(win), width)])
            with amp:
                if doc_backend is None:
                    h = fwd(x)  # (B, width, D)
                else:
                    docs = row_segments(x, win, width, doc_backend)
                    h = fwd(x.reshape(1, -1), docs=docs).reshape(x.shape[0], width, -1)  # (B, width, D)
                logits = model.logits_from_hidden(h[rows_b, rows_p])  # (M, V)
            plain = F.cross_entropy(logits.float(), tgt, reduction="sum")
            if tilt is not None:
                logits = tilt.apply(logits.float(), win[rows_b, 0] + rows_p)  # (M, V), target index
            if per_target is not None:
                nll_t = F.cross_entropy(logits.float(), tgt, reduction="none")  # (M,)
                per_target.index_add_(0, win[rows_b, 0] + rows_p, nll_t.double())
            nll = plain if tilt is None else F.cross_entropy(logits.float(), tgt, reduction="sum")
            sums[0] += nll.double()
            sums[4] += plain.double()
            sums[1] += tgt.numel()
            sums[2] += tab.count(prev, tgt, win[rows_b, 0] + rows_p + 1).sum().double()
            sums[3] += len(win)
    model.train(was_training)
    return sums


def score_windows(model, tokens: np.ndarray, windows: np.ndarray, width: int, tables: ByteTables,
                  batch_seqs: int, device, rank: int = 0, world: int = 1, autocast: bool = True,
                  compile: bool = False, progress: bool = False, tilt=None, doc_backend: str | None = None) -> dict:
    """Sum NLL (nats), scored targets and bytes over `windows`, split contiguously over ranks
    (with `tilt`: the n-gram-tilted NLL; `doc_backend`: attention within documents; see local_sums).

    Returns float64 sums all-reduced over the process group: nll, tokens, bytes, windows, and
    nll_untilted (the NLL without `tilt`).
    """
    device = torch.device(device)
    check_vocab(model, tokens, tables)
    lo, hi = len(windows) * rank // world, len(windows) * (rank + 1) // world
    mine = torch.from_numpy(windows[lo:hi]).to(device)  # (n, 3)
    tok = torch.from_numpy(tokens.astype(np.int64)).to(device)  # (N,)
    sums = local_sums(model, tok, mine, width, tables.to(device), batch_seqs, _hidden_fn(model, device, compile),
                      autocast_ctx(device, autocast), progress=progress and rank == 0,
                      tilt=None if tilt is None else tilt.to(device), doc_backend=doc_backend)
    all_reduce_(sums)
    nll, ntok, nbytes, nwin, plain = sums.tolist()
    return {"nll": nll, "tokens": int(ntok), "bytes": int(nbytes), "windows": int(nwin), "nll_untilted": plain}


def _bpb(nll: float, ntok: int, nbytes: int) -> tuple[float, float]:
    """(val_loss, val_bpb) = (nll / tokens, nll / (ln 2 * bytes))."""
    return nll / ntok, nll / (math.log(2) * nbytes)


def scores(nll: float, nll_untilted: float, ntok: int, nbytes: int) -> dict:
    """{val_loss, val_bpb} of `nll`, and {val_loss_untilted, val_bpb_untilted} of the same targets
    scored without the n-gram tilt (equal to the first two when no tilt ran)."""
    loss, val_bpb = _bpb(nll, ntok, nbytes)
    plain_loss, plain_bpb = _bpb(nll_untilted, ntok, nbytes)
    return {"val_loss": loss, "val_bpb": val_bpb, "val_loss_untilted": plain_loss, "val_bpb_untilted": plain_bpb}


def eval_nonsliding(model, tokens: np.ndarray, tables: ByteTables, seq_len: int, batch_seqs: int,
                    device, rank: int = 0, world: int = 1, autocast: bool = True, *,
                    compile: bool = False, progress: bool = False, tilt=None, doc_backend: str | None = None) -> dict:
    """Spec §2.3 on tokens truncated per §2.2 -> {val_loss, val_bpb, tokens, bytes, and the untilted
    pair of `scores`} (`tilt`, `doc_backend`: see local_sums)."""
    tokens = truncate(np.asarray(tokens), seq_len)
    windows = nonsliding_windows(len(tokens) - 1, seq_len)
    s = score_windows(model, tokens, windows, seq_len, tables, batch_seqs, device, rank, world,
                      autocast=autocast, compile=compile, progress=progress, tilt=tilt, doc_backend=doc_backend)
    return scores(s["nll"], s["nll_untilted"], s["tokens"], s["bytes"]) | {"tokens": s["tokens"], "bytes": s["bytes"]}


def eval_sliding(model, tokens: np.ndarray, tables: ByteTables, context: int, stride: int, batch_seqs: int,
                 device, rank: int = 0, world: int = 1, progress: bool = False, *,
                 autocast: bool = True, compile: bool = True, tilt=None) -> dict:
    """Spec §2.4 without tail duplicates, over every target of `tokens` (no truncation here)
    -> {val_loss, val_bpb, scored_tokens, scored_bytes, windows, and the untilted pair of `scores`}
    (`tilt`: see local_sums)."""
    tokens = np.asarray(tokens)
    if len(tokens) < 2:
        raise ValueError("sliding evaluation needs at least 2 tokens")
    windows = sliding_windows(len(tokens) - 1, context, stride)
    s = score_windows(model, tokens, windows, context, tables, batch_seqs, device, rank, world,
                      autocast=autocast, compile=compile, progress=progress, tilt=tilt)
    return scores(s["nll"], s["nll_untilted"], s["tokens"], s["bytes"]) | {
        "scored_tokens": s["tokens"], "scored_bytes": s["bytes"], "windows": s["windows"]}
