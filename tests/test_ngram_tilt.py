"""pgolf.evaluate.ngram_tilt: the token-only causal n-gram tilt (PR #2135's recipe) is the anchor's,
and it is legal.

Oracle: on the official validation prefix (1,040,297 targets) the hints equal, token for token, those
of PR #2135's own code (../shared/anchors/pr2135: online_ngram_tilt.py's build_hints_for_targets
at the logged settings, over its C state online_ngram_state.c compiled here; skipped without a C
compiler or the anchors), and the raw state (top token, float32 confidence) equals the C state's at
several orders, on the validation tokens and on an 8192-token-id stream.

Legality, each built to expose a leak: (a) a hint never moves when any token at or after its
target changes (fuzz, and the probe `pgolf rules` runs catches a leaky state); (b) the tilted
distribution sums to 1 over the vocabulary and is the closed form's; (c) with the tilt every
target is scored exactly once (sliding, non-sliding, TTT); (d) on text that never repeats, a state
updated before scoring would win a lot, ours wins nothing, and on repeated text ours wins only
from the repeat on.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _anchors import anchor_path
from conftest import tiny_model
from pgolf import config
from pgolf.config import EvaluateConfig
from pgolf.evaluate import ngram_tilt as nt
from pgolf.evaluate import ttt
from pgolf.shared import bpb
from pgolf.shared.shards import read_shard
from test_bpb import tiny_tables

ROOT = Path(__file__).resolve().parents[1]
VAL_PREFIX = ROOT.parent / "shared/data/fineweb_sp1024_val_prefix/fineweb_val_000000.bin"
SP1024 = ROOT / "data/tokenizer_src/fineweb_1024_bpe.model"
LOGGED = dict(token_order=16, token_threshold=0.800, token_boost=2.625, within_tau=99.0, within_boost=0.0,
              word_order=4, word_normalize="strip_punct_lower", word_tau=99.0, word_boost=0.0, agree_add_boost=0.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def repetitive(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Tokens with plenty of repeated stretches (so the state hints often) between random ones."""
    rng = np.random.default_rng(seed)
    out = list(rng.integers(0, vocab, 40))
    while len(out) < n:
        if rng.random() < 0.5:
            a = int(rng.integers(0, len(out)))
            out += out[a:a + int(rng.integers(5, 60))]
        else:
            out += list(rng.integers(0, vocab, int(rng.integers(1, 20))))
    return np.asarray(out[:n], dtype=np.uint16)


# ----------------------------------------------------------------------------- the state


@pytest.mark.parametrize("order", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize("vocab", [2, 7, 64])
def test_fast_pass_is_the_online_state_machine(order, vocab):
    y = repetitive(3000, vocab, seed=order * 100 + vocab)
    state = nt.OnlineNgram(order, seed=3 % vocab)
    ref = [state.step(int(t)) for t in y]
    for general in (False, True):  # the packed value sorts, and the argsort path
        hint, conf = nt.ngram_predictions(y, order, seed=3 % vocab, general=general)
        assert hint.tolist() == [h for h, _ in ref]
        assert conf.tolist() == [c for _, c in ref]  # float32 counts / totals, exactly
    assert (hint >= 0).sum() > 0 or order == 33


@pytest.mark.parametrize("order, vocab", [(2, 7), (5, 7), (3, 64)])
def test_pair_key_collisions_count_per_pair_key(order, vocab, monkeypatch):
    """With PAIR_MIX = 0 a pair key ignores its context: counts are shared across contexts, as in a
    hash table keyed by pair key (on the real stream a few pair keys collide from ~62M tokens on);
    both paths must count by pair key (7 tokens: <= 16 shared keys, 64: more)."""
    monkeypatch.setattr(nt, "PAIR_MIX", 0)
    y = repetitive(3000, vocab, seed=order)
    state = nt.OnlineNgram(order, seed=1)
    ref = [state.step(int(t)) for t in y]
    for general in (False, True):
        hint, conf = nt.ngram_predictions(y, order, seed=1, general=general)
        assert hint.tolist() == [h for h, _ in ref] and conf.tolist() == [c for _, c in ref]
    monkeypatch.setattr(nt, "PAIR_MIX", 1000003)
    assert nt.ngram_predictions(y, order, seed=1)[1].tolist() != conf.tolist()  # the collisions mattered


def test_short_and_constant_streams():
    for y in (np.zeros(0, np.uint16), np.array([5], np.uint16), np.zeros(50, np.uint16), np.arange(20) % 3):
        for order in (1, 2, 16):
            st = nt.OnlineNgram(order, seed=0)
            ref = [st.step(int(t)) for t in y]
            hint, conf = nt.ngram_predictions(y, order, 0)
            assert hint.tolist() == [h for h, _ in ref] and conf.tolist() == [c for _, c in ref], (y, order)


def test_state_semantics_by_hand():
    """order 3 (contexts of 2 tokens): look up, then count; a tie keeps the older top token."""
    st = nt.OnlineNgram(3, seed=9)  # the stream is 9, then the targets
    got = [st.step(t) for t in [1, 2, 1, 2, 1, 3, 1, 2, 1, 3, 1, 3, 2, 1, 5]]
    assert got[0] == (-1, 0.0)  # context (9,) too short: nothing looked up or counted
    assert got[1:4] == [(-1, 0.0)] * 3  # (9, 1), (1, 2), (2, 1) are new
    assert got[4] == (1, 1.0)  # (1, 2) was followed by 1 once
    assert got[5] == (2, 1.0)  # (2, 1) by 2 once; the target is 3
    assert got[8] == (1, 1.0)  # (1, 2): 1 twice out of 2
    assert got[9] == (2, 0.5)  # (2, 1): 2 once, 3 once -> the tie keeps 2, confidence 1/2
    assert got[10] == (1, 1.0) and got[11] == (2, 1.0)  # (1, 3) -> 1, (3, 1) -> 2
    assert got[14] == (3, float(np.float32(2) / np.float32(3)))  # (2, 1): 3 reached 2 > 1, top switched


@pytest.mark.parametrize("bad", [0, 34])
def test_order_out_of_range(bad):
    with pytest.raises(ValueError, match="order"):
        nt.ngram_predictions(np.arange(10), bad, 0)
    with pytest.raises(config.ConfigError, match="ngram_order"):
        config.from_dict("evaluate", {"ngram_order": bad})


@pytest.mark.parametrize("key, value", [("ngram_threshold", 1.5), ("ngram_threshold", -0.1), ("ngram_boost", 0.0),
                                        ("ngram_boost", float("inf"))])
def test_config_ranges(key, value):
    with pytest.raises(config.ConfigError, match=key):
        config.from_dict("evaluate", {key: value})


def test_defaults_are_the_logged_settings_and_off():
    cfg = EvaluateConfig()
    assert (cfg.ngram_tilt, cfg.ngram_order, cfg.ngram_threshold, cfg.ngram_boost) == (False, 16, 0.8, 2.625)


# ----------------------------------------------------------------------------- oracle: PR #2135's code


@pytest.fixture(scope="module")
def anchor(tmp_path_factory):
    """PR #2135's online_ngram_tilt module over its C state compiled into a temp folder."""
    src = anchor_path("pr2135", "online_ngram_tilt.py")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc / gcc) to build the anchor's online_ngram_state.c")
    lib = tmp_path_factory.mktemp("ngram") / "libonline_ngram_state.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src.parent / "online_ngram_state.c")],
                   check=True)
    pytest.importorskip("sentencepiece")
    spec = importlib.util.spec_from_file_location("anchor_pr2135_ngram", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.ONLINE_NGRAM_LIB = lib  # its builder would write beside the (read-only) source
    return mod


@pytest.fixture(scope="module")
def val_tokens():
    if not VAL_PREFIX.is_file():
        pytest.skip(f"{VAL_PREFIX} is absent")
    return read_shard(VAL_PREFIX)


def anchor_state(anchor, targets: np.ndarray, order: int):
    """(top token, confidence) of the anchor's C token state, seeded with targets[0] as it does."""
    st = anchor.OnlineNgramState(lib=anchor.ensure_online_ngram_lib(lambda *a: None), token_ctx_len=order - 1,
                                 token_table_bits=anchor.suggest_table_bits(len(targets), 0.55),
                                 within_table_bits=12,  # every token starts a word: the within channel idles
                                 starts_new_word_lut=np.ones(1 << 16, np.uint8),
                                 boundary_lut=np.zeros(1 << 16, np.uint8), seed_prefix_token=int(targets[0]))
    tok, conf, *_ = st.process_chunk(targets)
    st.close()
    return tok, conf


def test_oracle_hints_equal_the_anchors_on_the_validation_prefix(anchor, val_tokens):
    y = val_tokens[1:]  # the anchor's targets: all_tokens[1:]
    pkg = anchor.build_hints_for_targets(target_token_ids_np=y, tokenizer_path=str(SP1024), vocab_size=1024,
                                         log0=lambda *a: None, **LOGGED)
    ours = nt.stream_hints(val_tokens, 16, 0.8)  # what evaluate uses (seeded with tokens[0])
    same_seed = nt.gate(*nt.ngram_predictions(y, 16, int(y[0])), 0.8)  # seeded as the anchor
    gate = pkg["gate_mask"]
    assert len(ours) == len(gate) == 1_040_297
    assert int(gate.sum()) == int((ours >= 0).sum()) == 7970
    for mine in (ours, same_seed):
        assert np.array_equal(mine >= 0, gate), "gate mismatches"
        assert np.array_equal(mine[gate], pkg["hint_ids"][gate]), "hint mismatches"
    assert set(pkg["boost"][gate].tolist()) == {2.625}


@pytest.mark.parametrize("order", [2, 3, 5, 16])
def test_oracle_raw_state_equals_the_c_state(anchor, val_tokens, order):
    y = val_tokens[1:]
    tok, conf = anchor_state(anchor, y, order)
    seen = conf > 0
    assert seen.sum() > 8000
    for general in (False, True):
        hint, ours = nt.ngram_predictions(y, order, int(y[0]), general=general)
        assert np.array_equal(ours, conf)  # float32, bit for bit
        assert np.array_equal(hint[seen], tok[seen].astype(np.int32)) and (hint[~seen] == nt.NO_HINT).all()


@pytest.mark.parametrize("order", [2, 16, 33])
def test_oracle_large_token_ids(anchor, order):
    y = repetitive(200_000, 8192, seed=order)
    tok, conf = anchor_state(anchor, y, order)
    hint, ours = nt.ngram_predictions(y, order, int(y[0]))
    seen = conf > 0
    assert np.array_equal(ours, conf) and np.array_equal(hint[seen], tok[seen].astype(np.int32))
    assert seen.sum() > 20_000


# ----------------------------------------------------------------------------- (a) causality


@pytest.mark.parametrize("order", [2, 4, 16])
def test_a_hint_never_moves_when_a_later_token_changes(order):
    rng = np.random.default_rng(order)
    tokens = repetitive(4000, 16, seed=order)
    base = nt.stream_hints(tokens, order, 0.5)
    assert (base >= 0).sum() > 150  # the fuzz has hints to move
    for _ in range(60):
        p = int(rng.integers(1, len(tokens)))
        other = tokens.copy()
        if rng.random() < 0.5:
            other[p] = (other[p] + 1 + rng.integers(0, 15)) % 16  # one token
        else:
            other[p:] = repetitive(len(tokens) - p, 16, seed=int(rng.integers(1 << 30)))  # the whole suffix
        # hint i is for target tokens[i + 1]: the targets up to tokens[p] keep theirs
        assert np.array_equal(nt.stream_hints(other, order, 0.5)[:p], base[:p]), p


def leaky_hints(tokens: np.ndarray, order: int, threshold: float) -> np.ndarray:
    """The same state, updated with target t BEFORE t's lookup (the leak the tests must catch)."""
    st = nt.OnlineNgram(order, int(tokens[0]))
    out = []
    for t in tokens[1:].tolist():
        key = st._key() if st._ready() else None
        st.update(t)
        if key is None:
            out.append(nt.NO_HINT)
            continue
        total, top, tok = st.contexts[key]
        out.append(tok if np.float32(top) / np.float32(total) >= np.float32(threshold) else nt.NO_HINT)
    return np.asarray(out, dtype=np.int32)


def test_a_the_rules_probe_passes_ours_and_catches_a_leak():
    tokens = repetitive(3000, 16, seed=5)
    good = nt.causality_probe(tokens, 4, 0.8)
    assert good["max_changed"] == 0 and good["hinted"] > 100 and good["targets"] == 2999
    bad = nt.causality_probe(tokens, 4, 0.8, hints_fn=lambda t: leaky_hints(t, 4, 0.8))
    assert bad["max_changed"] > 0


# ----------------------------------------------------------------------------- (b) a distribution


def test_b_tilted_distribution_sums_to_one_and_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, 64, generator=g, dtype=torch.float64)
    hints = torch.randint(0, 64, (50,), generator=g)
    hints[::3] = nt.NO_HINT
    tilt = nt.Tilt(hints, 2.625)
    idx = torch.arange(50)
    tilted = tilt.apply(logits, idx)
    p = tilted.softmax(-1)
    assert torch.allclose(p.sum(-1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    on = hints >= 0
    assert torch.equal(tilted[~on], logits[~on])  # no hint: the plain distribution
    tgt = torch.randint(0, 64, (50,), generator=g)
    tgt[1::4] = hints[1::4].clamp(min=0)  # some hits
    nll = F.cross_entropy(logits, tgt, reduction="none")
    log_q = logits.log_softmax(-1).gather(1, hints.clamp(min=0)[:, None])[:, 0]
    closed = nt.tilted_nll(nll, log_q, tgt == hints, 2.625)
    assert torch.allclose(F.cross_entropy(tilted, tgt, reduction="none")[on], closed[on], atol=1e-12)
    # the boost moves mass to the hint only: every other token's ratio to the others is unchanged
    ratio = p[on] / logits[on].softmax(-1)
    others = torch.ones_like(ratio, dtype=torch.bool)
    others[torch.arange(int(on.sum())), hints[on]] = False
    assert torch.allclose(ratio[others].reshape(int(on.sum()), 63).std(-1), torch.zeros(int(on.sum()),
                                                                                       dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------- (c) scored once


class Counting:
    """A Tilt that records every target index it tilts."""

    def __init__(self, tilt):
        self.tilt, self.seen = tilt, []

    def to(self, device):
        return self

    def apply(self, logits, target_idx):
        self.seen.append(target_idx.clone())
        return self.tilt.apply(logits, target_idx)

    def counts(self, n):
        return np.bincount(torch.cat(self.seen).numpy(), minlength=n)


def test_c_every_target_scored_once_with_the_tilt():
    model = tiny_model(1)
    tokens = repetitive(1201, 64, seed=1)
    tilt = nt.Tilt.for_tokens(tokens, 4, 0.5, 2.625)
    assert tilt.hinted > 100
    c = Counting(tilt)
    s = bpb.eval_sliding(model, tokens, tiny_tables(), 64, 16, 8, "cpu", tilt=c)
    assert s["scored_tokens"] == 1200 and (c.counts(1200) == 1).all()
    c = Counting(tilt)
    f = bpb.eval_nonsliding(model, tokens, tiny_tables(), 64, 8, "cpu", tilt=c)
    assert f["tokens"] == 1152 and (c.counts(1200)[:1152] == 1).all() and (c.counts(1200)[1152:] == 0).all()
    cfg = EvaluateConfig(context=32, stride=8, batch_seqs=4, device="cpu", compile=False, ttt_enabled=True,
                         ttt_chunk_tokens=300, ttt_epochs=1, ttt_rank=2, ttt_batch_seqs=4)
    c = Counting(tilt)
    r = ttt.eval_ttt(tiny_model(1), tokens, tiny_tables(), cfg, "cpu", tilt=c)
    assert r.scored_tokens == 1200 and (c.counts(1200) == 1).all()


# ----------------------------------------------------------------------------- (d) no gain from a leak


def test_d_a_leaky_state_would_win_ours_does_not():
    model = tiny_model(2)
    rng = np.random.default_rng(7)
    fresh = rng.integers(0, 64, 1025).astype(np.uint16)  # order-8 contexts never repeat in it
    kw = dict(context=64, stride=16, batch_seqs=8, device="cpu")

    def score(tokens, hints=None):
        tilt = None if hints is None else nt.Tilt(torch.from_numpy(hints.astype(np.int64)), 2.625)
        return bpb.eval_sliding(model, tokens, tiny_tables(), tilt=tilt, **kw)["val_bpb"]

    plain = score(fresh)
    ours = nt.stream_hints(fresh, 8, 0.8)
    leak = leaky_hints(fresh, 8, 0.8)
    assert (ours >= 0).sum() == 0 and (leak >= 0).sum() > 1000  # the leak hints the answer itself
    assert score(fresh, ours) == plain
    assert score(fresh, leak) < plain - 0.3  # measurably better: what a leak would buy
    # repeated text: ours wins, but only on the second copy (from tokens it has seen)
    twice = np.concatenate([fresh[:513], fresh[1:513]])
    ours = nt.stream_hints(twice, 8, 0.8)
    assert (ours[:512] >= 0).sum() == 0 and (ours[512 + 8:] >= 0).all()
    assert score(twice, ours) < score(twice) - 0.3


# ----------------------------------------------------------------------------- (e) the untilted score beside


def test_e_the_untilted_score_of_a_tilted_pass_is_a_run_without_the_tilt():
    """Every scoring path reports, beside its tilted score, the score of the same targets without the
    tilt; it must equal a second run with the tilt off (TTT adapts on the plain loss, so even the
    adapted paths agree), while the tilted score moves."""
    from pgolf.evaluate import phased

    tokens = repetitive(1201, 64, seed=1)
    tilt = nt.Tilt.for_tokens(tokens, 4, 0.5, 2.625)
    stream = EvaluateConfig(context=32, stride=8, batch_seqs=4, device="cpu", compile=False, ttt_enabled=True,
                            ttt_chunk_tokens=300, ttt_epochs=1, ttt_rank=2, ttt_batch_seqs=4, ttt_lr=0.05)
    per_doc = EvaluateConfig(context=32, stride=8, batch_seqs=4, device="cpu", compile=False, ttt_enabled=True,
                             ttt_scheme="phased", ttt_rank=2, ttt_alpha=4.0, ttt_lr=0.05, ttt_doc_batch=3,
                             ttt_doc_chunk=7, ttt_prefix_docs=4, ttt_global_chunk_tokens=64, ttt_global_lr=0.05)
    paths = {
        "sliding": lambda t: bpb.eval_sliding(tiny_model(1), tokens, tiny_tables(), 64, 16, 8, "cpu", tilt=t),
        "nonsliding": lambda t: bpb.eval_nonsliding(tiny_model(1), tokens, tiny_tables(), 64, 8, "cpu", tilt=t),
        "stream ttt": lambda t: vars(ttt.eval_ttt(tiny_model(1), tokens, tiny_tables(), stream, "cpu", tilt=t)),
        "phased ttt": lambda t: vars(phased.eval_phased(tiny_model(1), tokens, tiny_tables(), per_doc, "cpu",
                                                        tilt=t, bos_id=1)),
    }
    for name, score in paths.items():
        on, off = score(tilt), score(None)
        assert on["val_bpb_untilted"] == pytest.approx(off["val_bpb"], abs=1e-12), name
        assert on["val_loss_untilted"] == pytest.approx(off["val_loss"], abs=1e-12), name
        assert off["val_bpb_untilted"] == off["val_bpb"], name  # no tilt: one score
        assert abs(on["val_bpb"] - off["val_bpb"]) > 1e-3, name  # the tilt did move the score
