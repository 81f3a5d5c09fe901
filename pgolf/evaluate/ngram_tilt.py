"""Token-only causal n-gram tilt of the scored distribution (PR #2135's recipe; issue 29 item 3).

This module owns (1) the online token n-gram state over the validation stream: which token it
hints for each target and how confident it is, from the tokens before that target only; and
(2) the tilt of a scored row, log_softmax(logits + boost * onehot(hint)), applied where the
confidence reaches `evaluate.ngram_threshold` (a proper distribution: renormalised over the whole
vocabulary; elsewhere the plain log_softmax). pgolf.evaluate.evaluate imports it only when
`evaluate.ngram_tilt` is on; pgolf.shared.bpb applies a `Tilt` to each scored row; `pgolf rules`
re-checks causality on the run's validation tokens (`ngram_causal`).

The state (the same state machine as PR #2135's online_ngram_state.c token channel, so that on
one token stream the hints are equal, tests/test_ngram_tilt.py checks it token for token):

* the stream is `seed, y_0, y_1, ...` where y_i is the i-th target (tokens[i + 1]); evaluate
  seeds with tokens[0], the first input, so the context of y_i is the `order - 1` stream tokens
  right before it (for y_i with i < order - 2 there are too few and nothing is looked up or
  counted). The anchor seeds with y_0 itself (only the first context differs; on the validation
  prefix the hints are the same). No reset at document boundaries: one context window slides
  over the whole stream;
* a context (the last `order - 1` tokens, oldest first) is a 64-bit key: XOR over positions j of
  token * COEFFS[j] (mod 2^64); a (context, next token) pair is (ctx * PAIR_MIX) XOR
  (token * COEFFS[(order - 1) % 32]). Counts are kept per key: equal keys share counts (the
  anchor's hash tables compare these full keys, so collisions act the same in both). A context
  key is below 2^38 (a token id < 2^16 times a multiplier < 2^22), below 2^32 for 1024 token ids,
  so different contexts do collide at scale: on 1.04M sp1024 tokens 269 of 7,970 hints come
  from such shared counts, on 16.6M about 38 %; a few pair keys collide from ~62M tokens on;
* for target y_i: LOOK UP first -- the context's entry (total, top_count, top_token) as it stands
  after y_0 .. y_{i-1}; hint = top_token, confidence = float32(top_count) / float32(total), none
  when the context was never seen; THEN count y_i: pair count += 1, the context's total += 1, and
  top_token becomes y_i when its new pair count is strictly greater than top_count (ties keep
  the older token). So the hint for y_i never depends on y_i or anything after it.

`ngram_predictions` computes every target's (hint, confidence) in one vectorised numpy pass: a
lookup only sees the earlier updates of its own context key, so sorting the updates by (context
key, time) -- one value sort of key and position packed in a 64-bit word -- gives each lookup's
state as running counts over its group (contexts seen once are dropped first; pair counts are
per (context, token) unless a pair key is shared, then per pair key, as the anchor's table).
`OnlineNgram` is the same state machine a token at a time, the readable reference the tests hold
the fast pass to. Hints are host-side, computed once per evaluation on every rank, inside the
evaluation clock (bench/bench_ngram.py: ~13 s for 62M tokens on one core).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

# Multipliers of the anchor's hashes (PR #2135 online_ngram_state.c; numbers, needed for equal keys).
COEFFS = (36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
          1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243,
          2359319, 2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973)
PAIR_MIX = 1000003
MAX_ORDER = len(COEFFS) + 1  # a context of at most 32 tokens (one multiplier per position)
NO_HINT = -1
_MASK = (1 << 64) - 1


def _check_order(order: int) -> int:
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"n-gram order must be in [1, {MAX_ORDER}], got {order}")
    return order - 1


# ----------------------------------------------------------------------------- the state


class OnlineNgram:
    """The token n-gram state, one token at a time (reference; `ngram_predictions` is the fast pass).

    `predict()` -> (hint, confidence) for the next target from what was seen so far
    ((NO_HINT, 0.0) when the context is too short or new); `update(tok)` counts the next target
    and slides the context; `step(tok)` = predict, then update (score first).
    """

    def __init__(self, order: int, seed: int):
        self.ctx_len = _check_order(order)
        self.context: deque[int] = deque([int(seed)] if self.ctx_len else [], maxlen=self.ctx_len)  # oldest first
        self.pairs: dict[int, int] = {}  # pair key -> count
        self.contexts: dict[int, list[int]] = {}  # context key -> [total, top_count, top_token]

    def _ready(self) -> bool:
        return len(self.context) == self.ctx_len

    def _key(self) -> int:
        key = 0
        for j, tok in enumerate(self.context):
            key ^= tok * COEFFS[j]
        return key

    def predict(self) -> tuple[int, float]:
        entry = self.contexts.get(self._key()) if self._ready() else None
        if entry is None:
            return NO_HINT, 0.0
        total, top_count, top_tok = entry
        return top_tok, float(np.float32(top_count) / np.float32(total))

    def update(self, tok: int) -> None:
        tok = int(tok)
        if self._ready():
            key = self._key()
            pair = ((key * PAIR_MIX) ^ (tok * COEFFS[self.ctx_len % len(COEFFS)])) & _MASK
            count = self.pairs.get(pair, 0) + 1
            self.pairs[pair] = count
            entry = self.contexts.get(key)
            if entry is None:
                self.contexts[key] = [1, count, tok]
            else:
                entry[0] += 1
                if count > entry[1]:
                    entry[1], entry[2] = count, tok
        if self.ctx_len:
            self.context.append(tok)

    def step(self, tok: int) -> tuple[int, float]:
        out = self.predict()
        self.update(tok)
        return out


# ----------------------------------------------------------------------------- the fast pass


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """bool (m,): True where a run of equal keys starts."""
    new = np.empty(len(sorted_keys), dtype=bool)
    new[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    return new


def _rank_in_group(new: np.ndarray) -> np.ndarray:
    """int64 (m,): 0-based index of each element within its run (runs start where `new`)."""
    idx = np.arange(len(new), dtype=np.int64)
    return idx - np.maximum.accumulate(np.where(new, idx, 0))


def _groups_by_sorting(key: np.ndarray, tok: np.ndarray, pair: np.ndarray):
    """Every update in (context, time) order: (positions, group starts, pair counts). General and
    exact for any keys; two stable argsorts."""
    order_p = np.argsort(pair, kind="stable")  # equal pair keys in time order
    count = np.empty(len(pair), dtype=np.int64)
    count[order_p] = _rank_in_group(_group_starts(pair[order_p])) + 1
    del order_p
    pos = np.argsort(key, kind="stable")
    return pos, _group_starts(key[pos]), count[pos]


def _colliding_pairs(key: np.ndarray, tok: np.ndarray, tb: int, ctx_len: int) -> np.ndarray:
    """Sorted pair keys shared by two or more different (context key, token) pairs of the stream
    (a hash table keyed by pair key counts those together); usually none, a few on 62M tokens."""
    combo = np.sort((key << np.uint64(tb)) | tok)
    combo = combo[_group_starts(combo)]  # the distinct (context, token) pairs
    ck, ct = combo >> np.uint64(tb), combo & np.uint64((1 << tb) - 1)
    del combo
    pk = np.sort(_pair_key(ck, ct, ctx_len))
    dup = pk[1:][pk[1:] == pk[:-1]]
    return np.unique(dup)


def _pair_key(key: np.ndarray, tok: np.ndarray, ctx_len: int) -> np.ndarray:
    """The pair key of (context key, next token): (ctx * PAIR_MIX) XOR (token * COEFFS[ctx_len % 32])."""
    return (key * np.uint64(PAIR_MIX)) ^ (tok * np.uint64(COEFFS[ctx_len % len(COEFFS)]))


def _groups_by_packing(key: np.ndarray, tok: np.ndarray, pair: np.ndarray, ctx_len: int):
    """As _groups_by_sorting, for the updates of contexts seen twice or more only (no other is ever
    found by a lookup), with value sorts of packed words instead of argsorts of the whole stream;
    None when a context key is too wide to share a 64-bit word with a position."""
    m = len(key)
    kb = int(key.max()).bit_length()
    tb = max(int(tok.max()).bit_length(), 1)
    ib = min(64 - kb, 63)  # position bits
    if kb + tb > 64 or ib < 1 or m >= (1 << ib):
        return None
    packed = np.sort((key << np.uint64(ib)) | np.arange(m, dtype=np.uint64))  # by context, then time
    ks = packed >> np.uint64(ib)
    new = _group_starts(ks)
    last = np.empty(m, dtype=bool)
    last[:-1] = new[1:]
    last[-1:] = True
    keep = ~(new & last)  # not a context seen once
    pos = (packed[keep] & np.uint64((1 << ib) - 1)).astype(np.int64)
    new = new[keep]
    del packed, ks, last, keep
    # pair counts: occurrence number of (context, token) in time order, within the kept updates
    s = len(pos)
    gid = (np.cumsum(new) - 1).astype(np.uint64)
    t = tok[pos]
    word = (gid << np.uint64(tb)) | t
    jb = max(s - 1, 1).bit_length()
    if int(word.max(initial=0)).bit_length() + jb <= 64:
        order_p = (np.sort((word << np.uint64(jb)) | np.arange(s, dtype=np.uint64))
                   & np.uint64((1 << jb) - 1)).astype(np.int64)
    else:
        order_p = np.argsort(word, kind="stable")
    count = np.empty(s, dtype=np.int64)
    count[order_p] = _rank_in_group(_group_starts(word[order_p])) + 1
    del word, order_p
    # where different (context, token) pairs share a pair key, count by pair key over the stream
    shared = _colliding_pairs(key, tok, tb, ctx_len)
    if len(shared):
        if len(shared) <= 16:
            hit = np.zeros(m, dtype=bool)
            for v in shared:
                hit |= pair == v
        else:
            at = np.searchsorted(shared, pair).clip(max=len(shared) - 1)
            hit = shared[at] == pair
        x = np.flatnonzero(hit)  # time order
        o = np.argsort(pair[x], kind="stable")
        exact = np.empty(len(x), dtype=np.int64)
        exact[o] = _rank_in_group(_group_starts(pair[x][o])) + 1
        at = np.searchsorted(x, pos).clip(max=max(len(x) - 1, 0))
        mine = x[at] == pos
        count[mine] = exact[at[mine]]
    return pos, new, count


def _keys(stream: np.ndarray, tok: np.ndarray, ctx_len: int, first: int, block: int = 1 << 15):
    """(context key, pair key) uint64 (m,) of the updates of targets first.. (tok = their tokens):
    the context of target i is stream[i + 1 - ctx_len : i + 1], oldest first. In blocks that stay
    in cache (ctx_len passes each)."""
    m = len(tok)
    key = np.zeros(m, dtype=np.uint64)
    pair = np.empty(m, dtype=np.uint64)
    tmp = np.empty(min(block, m), dtype=np.uint64)
    mix, last = np.uint64(PAIR_MIX), np.uint64(COEFFS[ctx_len % len(COEFFS)])
    for a in range(0, m, block):
        b = min(a + block, m)
        k, t = key[a:b], tmp[:b - a]
        for j in range(ctx_len):
            lo = first + 1 - ctx_len + j + a
            np.multiply(stream[lo:lo + b - a], np.uint64(COEFFS[j]), out=t)
            np.bitwise_xor(k, t, out=k)
        np.multiply(k, mix, out=pair[a:b])
        np.multiply(tok[a:b], last, out=t)
        np.bitwise_xor(pair[a:b], t, out=pair[a:b])
    return key, pair


def ngram_predictions(targets: np.ndarray, order: int, seed: int, *,
                      general: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(hint int32 (n,), confidence float32 (n,)) for every target of `targets` (n,) from the
    state seeded with `seed`: equal to OnlineNgram(order, seed).step(y) over the targets in order,
    with NO_HINT / 0.0 where the state has nothing for that context. `general` forces the
    argsort path (the packed one falls back to it by itself only for keys too wide to pack)."""
    ctx_len = _check_order(order)
    y = np.asarray(targets).astype(np.uint64)
    n = len(y)
    hint = np.full(n, NO_HINT, dtype=np.int32)
    conf = np.zeros(n, dtype=np.float32)
    first = max(ctx_len - 1, 0)  # the first target whose context is full (the seed + ctx_len - 1 targets)
    m = n - first
    if m <= 0:
        return hint, conf
    stream = np.concatenate([np.array([seed], dtype=np.uint64), y])  # stream[i + 1] = y[i]
    tok = y[first:]
    key, pair = _keys(stream, tok, ctx_len, first)
    del stream
    groups = None if general else _groups_by_packing(key, tok, pair, ctx_len)
    pos, new, count = groups if groups is not None else _groups_by_sorting(key, tok, pair)
    del key, pair
    # each context group in time order: after k updates, total = k, top_count = the running max
    # of the pair counts, top_token = the token of the update that first reached that max
    seen = _rank_in_group(new)  # updates of this context before this one = total at its lookup
    gid = np.cumsum(new) - 1
    run_max = np.maximum.accumulate((gid << 32) | count) & 0xFFFFFFFF  # per-group running max (count < 2^32)
    record = new.copy()
    record[1:] |= count[1:] > run_max[:-1]
    idx = np.arange(len(pos), dtype=np.int64)
    top_tok = tok[pos][np.maximum.accumulate(np.where(record, idx, 0))]
    # the lookup of element p (not a group's first) sees the state after element p - 1
    look = np.flatnonzero(~new)
    out = first + pos[look]
    hint[out] = top_tok[look - 1].astype(np.int32)
    conf[out] = run_max[look - 1].astype(np.float32) / seen[look].astype(np.float32)
    return hint, conf


def gate(hint: np.ndarray, conf: np.ndarray, threshold: float) -> np.ndarray:
    """int32 hints kept where confidence >= threshold (compared in float32, as the anchor), else NO_HINT."""
    return np.where((conf >= np.float32(threshold)) & (hint >= 0), hint, NO_HINT).astype(np.int32)


def stream_hints(tokens: np.ndarray, order: int, threshold: float) -> np.ndarray:
    """int32 (N-1,): the hint for target tokens[i + 1] (NO_HINT = no tilt), from tokens[: i + 1]
    only; the state is seeded with tokens[0]."""
    tokens = np.asarray(tokens)
    hint, conf = ngram_predictions(tokens[1:], order, int(tokens[0]))
    return gate(hint, conf, threshold)


# ----------------------------------------------------------------------------- the tilt


@dataclass(frozen=True)
class Tilt:
    """Per-target hints (T,) int32 (NO_HINT = none; 4 bytes a target on the device) and the boost:
    what pgolf.shared.bpb applies to each scored row."""

    hints: torch.Tensor
    boost: float

    @classmethod
    def for_tokens(cls, tokens: np.ndarray, order: int, threshold: float, boost: float) -> "Tilt":
        return cls(torch.from_numpy(stream_hints(tokens, order, threshold)), float(boost))

    def to(self, device) -> "Tilt":
        return Tilt(self.hints.to(device), self.boost)

    @property
    def hinted(self) -> int:
        return int((self.hints >= 0).sum())

    def apply(self, logits: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """logits (M, V) float of the targets at index target_idx (M,) -> logits + boost * onehot(hint)
        on the hinted rows (cross-entropy of it = -log of the renormalised tilted softmax)."""
        h = self.hints[target_idx]  # (M,)
        add = torch.where(h >= 0, self.boost, 0.0).to(logits.dtype)  # (M,)
        return logits.scatter_add(1, h.clamp(min=0).long()[:, None], add[:, None])


def tilted_nll(nll: torch.Tensor, log_q: torch.Tensor, hit: torch.Tensor, boost: float) -> torch.Tensor:
    """Closed form of the tilted NLL from the plain one: nll - boost * hit + log1p(q (e^boost - 1)),
    q = p(hint) (for tests: equals cross-entropy of `Tilt.apply`'s logits)."""
    growth = torch.expm1(torch.tensor(boost, dtype=nll.dtype))  # e^boost - 1
    return nll - boost * hit.to(nll.dtype) + torch.log1p(log_q.exp() * growth)


# ----------------------------------------------------------------------------- causality check


def causality_probe(tokens: np.ndarray, order: int, threshold: float, cuts: int = 8, seed: int = 0,
                    hints_fn=None) -> dict:
    """Replace the tokens from position p on (random tokens of the same range, `cuts` random p)
    and compare the hints of every target up to p: {"cuts", "max_changed" (hints that moved at
    one cut; 0 = causal), "hinted" (hints on the unchanged stream), "targets"}. `hints_fn`
    (tokens -> (N-1,) hints) defaults to the evaluation's own, stream_hints(tokens, order, threshold)."""
    fn = hints_fn or (lambda t: stream_hints(t, order, threshold))
    tokens = np.asarray(tokens)
    rng = np.random.default_rng(seed)
    base = fn(tokens)
    vocab = int(tokens.max()) + 1
    worst = 0
    for p in sorted(rng.integers(1, len(tokens), size=cuts).tolist()):
        other = tokens.copy()
        other[p:] = rng.integers(0, vocab, size=len(tokens) - p).astype(tokens.dtype)
        # hint index i is target tokens[i + 1]: indices < p are the targets tokens[1 .. p], the last
        # of which changed itself -- its hint too must come from tokens[: p] alone
        worst = max(worst, int((fn(other)[:p] != base[:p]).sum()))
    return {"cuts": cuts, "max_changed": worst, "hinted": int((base >= 0).sum()), "targets": len(base)}
