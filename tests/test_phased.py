"""pgolf.evaluate.phased: phased per-document score-first TTT is legal and does what it says.

Legality is tested with a micro GPT, documents of a few chunks and a learning rate large enough
that every update shows in the scores: each target is scored once, in a window of its own
document only (checked against a one-forward-per-target reference); a document's first chunk is
the artifact model's own score, later chunks move; changing a token never moves the score of an
earlier target of its document, of another document of its batch, or of any document scored
before it, while it does move its document's later chunks (the test has power); the global pass
runs only after the prefix documents are scored, and moves only the documents after them. Also
the adapter sites against merged weights, the rank split, the evaluate stage and bad params."""

import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from pgolf.config import ConfigError, EvaluateConfig, check
from pgolf.evaluate import phased
from pgolf.evaluate.evaluate import load_model, run
from pgolf.shared import bpb, progress
from pgolf.shared.model import softcap
from test_bpb import tiny_tables, tiny_tokens
from test_evaluate import PARAMS, gate, make_workdir, paths, run_stage, tables as wd_tables, val_tokens

CFG = EvaluateConfig(context=16, stride=4, batch_seqs=4, device="cpu", compile=False, ttt_enabled=True,
                     ttt_scheme="phased", ttt_rank=4, ttt_alpha=8.0, ttt_optimizer="adam", ttt_lr=0.05,
                     ttt_momentum=0.0, ttt_beta2=0.99, ttt_weight_decay=0.5, ttt_doc_batch=3, ttt_doc_chunk=5,
                     ttt_prefix_docs=0, ttt_global_chunk_tokens=32, ttt_global_batch_seqs=2, ttt_global_lr=0.05)
STILL = dataclasses.replace(CFG, ttt_lr=1e-12)  # adapters that never move: the model's own scores
N = 241
BOS = 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def toks():
    return tiny_tokens(N)


def run_phased(cfg=CFG, tokens=None, seed=1, **kw):
    return phased.eval_phased(tiny_model(seed), toks() if tokens is None else tokens, tiny_tables(), cfg, "cpu",
                              record=True, bos_id=BOS, **kw)


def doc_of(tokens) -> np.ndarray:
    """Target index (position - 1) -> its document's row in phased.documents."""
    docs = phased.documents(tokens, BOS)
    out = np.empty(len(tokens) - 1, dtype=np.int64)
    for d, (s, n) in enumerate(docs.tolist()):
        out[s:s + n - 1] = d
    return out


# ----------------------------------------------------------------------------- documents, order


@pytest.mark.parametrize("tokens,want", [
    ([1, 5, 6, 1, 7, 1, 8, 9], [[0, 4], [3, 3], [5, 3]]),
    ([4, 5, 1, 7, 8], [[0, 3], [2, 3]]),  # no BOS at 0: the head is a document too
    ([1, 5, 6, 1], [[0, 4]]),  # a lone trailing BOS is the last target of the document before
])
def test_documents_end_at_the_next_bos_and_cover_every_target_once(tokens, want):
    docs = phased.documents(np.array(tokens), BOS)
    assert docs.tolist() == want
    covered = np.concatenate([np.arange(s + 1, s + n) for s, n in docs.tolist()])
    np.testing.assert_array_equal(covered, np.arange(1, len(tokens)))


def test_batches_run_longest_first_and_global_passes_follow_the_prefix():
    docs = np.array([[0, 5], [5, 9], [14, 2], [16, 9], [25, 7], [32, 3], [35, 4]])
    groups = phased.batches(docs, 3)  # ascending: 2,5,6 | 0,4,1 | 3; the last two tie at 9: kept in order
    assert [g.tolist() for g in groups] == [[0, 4, 1], [3], [2, 5, 6]]
    assert phased.phase_ends(groups, 0, 1) == []
    assert phased.phase_ends(groups, 4, 1) == [(1, 4)]  # after batch 1: 4 scored
    assert phased.phase_ends(groups, 2, 1) == [(0, 2)]  # after batch 0: 3 scored, the first 2 trained on
    assert phased.phase_ends(groups, 100, 2) == [(0, 3)]  # the second would follow the last batch


def window(ci: int, n_pred: int, chunk: int, context: int) -> tuple[int, int, int]:
    """The reference's window of chunk ci of a document of n_pred targets: (start, length, the
    chunk's first target within it); it ends at the chunk's end, at most `context` long."""
    end = n_pred if ci == -(-n_pred // chunk) - 1 else (ci + 1) * chunk
    start = max(0, end - context)
    return start, end - start, ci * chunk - start


def test_chunk_rows_by_hand():
    """A document of 12 targets at stream position 2 (chunks of 5, context 8) beside one of 3."""
    tok = torch.arange(20) + 10  # token id = position + 10
    rows = torch.tensor([[2, 13], [15, 4]])
    c = phased.chunk_rows(tok, rows, 0, 5, 8, True)
    assert c.x.tolist() == [list(range(12, 17)), [25, 26, 27, 0, 0]]  # width 5; the second ends at its last target
    assert c.pos.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]] and c.train.tolist() == [True, False]
    c = phased.chunk_rows(tok, rows, 1, 5, 8, True)
    assert c.x.tolist() == [list(range(14, 22)), [0] * 8]  # window 2..9 of the first; the second is done
    assert c.pos.tolist() == [[3, 4, 5, 6, 7], [0] * 5] and c.at.tolist() == [list(range(8, 13)), [1] * 5]
    assert c.live.tolist() == [[True] * 5, [False] * 5] and c.train.tolist() == [True, False]
    c = phased.chunk_rows(tok, rows[:1], 2, 5, 8, False)  # last chunk: targets 10, 11, window 4..11
    assert c.x.tolist() == [list(range(16, 24))] and c.pos.tolist() == [[6, 7, 0, 0, 0]]
    assert c.at.tolist() == [[13, 14, 1, 1, 1]] and c.tgt.tolist() == [[23, 24, 11, 11, 11]]
    assert c.prev.tolist() == [[22, 23, 10, 10, 10]] and c.live.tolist() == [[True, True, False, False, False]]
    assert c.train.tolist() == [False]
    assert [window(ci, 12, 5, 8) for ci in range(3)] == [(0, 5, 0), (2, 8, 3), (4, 8, 6)]  # the same windows


# ----------------------------------------------------------------------------- legality


def naive_scores(tokens, cfg=CFG, seed=1) -> torch.Tensor:
    """Per target: one unpadded forward of the model alone on the window `window` gives it
    (its own document's tokens only), float64 log-softmax over the vocabulary."""
    model = tiny_model(seed)
    tok = torch.from_numpy(tokens.astype(np.int64))
    out = torch.full((len(tokens) - 1,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for s, n in phased.documents(tokens, BOS).tolist():
            for c in range(-(-(n - 1) // cfg.ttt_doc_chunk)):
                ws, wl, off = window(c, n - 1, cfg.ttt_doc_chunk, cfg.context)
                logits = model.forward_logits(tok[s + ws:s + ws + wl][None])[0]  # (wl, V)
                for j in range(off, wl):
                    assert torch.isnan(out[s + ws + j])  # scored once
                    out[s + ws + j] = -F.log_softmax(logits[j].double(), -1)[tok[s + ws + j + 1]]
    return out


def test_without_learning_every_target_is_scored_once_in_its_own_document_window():
    tokens = toks()
    r = run_phased(STILL)
    ref = naive_scores(tokens)
    assert not torch.isnan(ref).any() and r.scored_tokens == N - 1 and r.docs == len(phased.documents(tokens, BOS))
    torch.testing.assert_close(r.per_target, ref, atol=2e-5, rtol=0)
    tab = tiny_tables()
    t = torch.from_numpy(tokens.astype(np.int64))
    nbytes = int(tab.count(t[:-1], t[1:]).sum())  # every target's bytes, by hand
    assert r.scored_bytes == nbytes
    want = float(ref.sum()) / nbytes / np.log(2)
    assert r.val_bpb == pytest.approx(want, rel=1e-5)


def test_each_documents_first_chunk_is_the_models_own_score_and_later_chunks_learn():
    tokens = toks()
    r, still = run_phased(), run_phased(STILL)
    first = np.zeros(N - 1, dtype=bool)
    for s, n in phased.documents(tokens, BOS).tolist():
        first[s:s + min(n - 1, CFG.ttt_doc_chunk)] = True
    torch.testing.assert_close(r.per_target[first], still.per_target[first], atol=1e-6, rtol=0)
    assert (r.per_target[~first] - still.per_target[~first]).abs().max() > 0.05  # the adapters act


def test_progress_counts_targets_from_the_longest_documents_batch_to_every_target(monkeypatch, capsys):
    """The progress line counts targets, not batches (the batches run longest first, so they are
    unequal): the first line is the first batch's targets, the last every target of the stream."""
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a line at every batch
    run_phased(STILL, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    docs = phased.documents(toks(), BOS)
    group = phased.batches(docs, CFG.ttt_doc_batch)[0]  # the longest document's batch
    first = int(docs[group, 1].sum()) - len(group)
    assert lines[0].startswith(f"ttt: {first:,}/{N - 1:,} target (")
    assert lines[-1].startswith(f"ttt: {N - 1:,}/{N - 1:,} target (100%)") and lines[-1].endswith(", done")


def test_finished_documents_leave_the_batch_and_no_score_moves(monkeypatch):
    """Chunk steps drop a batch's leading finished documents: the same scores, with learning, as
    running every row of the batch each step (done_rows forced to 0), and fewer rows run."""
    rows = np.array([[0, 6], [6, 12], [18, 30]])  # ascending length: 1, 3 and 6 chunks of 5
    assert [phased.done_rows(rows, ci, 5) for ci in range(6)] == [0, 1, 1, 2, 2, 2]
    seen = []
    chunk_rows = phased.chunk_rows
    monkeypatch.setattr(phased, "chunk_rows", lambda tok, r, *a: seen.append(len(r)) or chunk_rows(tok, r, *a))
    dropped, dropped_rows = run_phased(), sum(seen)
    seen.clear()
    monkeypatch.setattr(phased, "done_rows", lambda *a: 0)
    every, every_rows = run_phased(), sum(seen)
    assert every_rows > dropped_rows  # the test documents differ in length: rows were dropped
    torch.testing.assert_close(dropped.per_target, every.per_target, atol=1e-5, rtol=0)
    assert dropped.val_bpb == pytest.approx(every.val_bpb, rel=1e-6) and dropped.scored_tokens == every.scored_tokens


def test_compiled_chunk_steps_score_as_eager_from_one_graph(monkeypatch):
    """evaluate.ttt_compile: compiled_chunk_logits (torch.compile(dynamic=True); aot_eager here:
    dynamo and autograd's tracing without a C++ compiler) over a whole phased run gives the eager
    scores from one graph, though rows (down to one) and widths (from the chunk's up) change every
    step and a short batch runs."""
    from torch._dynamo.utils import counters

    on = dataclasses.replace(CFG, ttt_compile=True)
    assert phased.chunk_forward(CFG, "cuda") is phased.chunk_logits  # off
    assert phased.chunk_forward(on, "cpu") is phased.chunk_logits  # CPU: eager
    assert phased.chunk_forward(on, "cuda") is phased.compiled_chunk_logits
    groups = phased.batches(phased.documents(toks(), BOS), CFG.ttt_doc_batch)
    assert min(map(len, groups)) < CFG.ttt_doc_batch  # a short batch
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(phased, "_COMPILED", [torch.compile(phased.chunk_logits, dynamic=True, backend="aot_eager")])
    monkeypatch.setattr(phased, "chunk_forward", lambda cfg, device: phased.compiled_chunk_logits)
    rows = []
    chunk_rows = phased.chunk_rows
    monkeypatch.setattr(phased, "chunk_rows", lambda tok, r, *a: rows.append(len(r)) or chunk_rows(tok, r, *a))
    got = run_phased()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert 1 in rows and max(rows) == CFG.ttt_doc_batch
    assert graphs == 1, graphs
    monkeypatch.undo()
    torch.testing.assert_close(got.per_target, run_phased().per_target, atol=1e-5, rtol=1e-5)  # fp32 reordering


def test_a_short_batch_gets_fresh_adapters_and_leaves_the_carried_ones_as_they_were(monkeypatch):
    """ttt_keep_a: A carries from batch to batch, but a short batch runs on the last rows of fresh
    adapters (the same shapes, so no new compiled graph) and the carried A comes back after it."""
    groups = phased.batches(phased.documents(toks(), BOS), CFG.ttt_doc_batch)
    sizes = [len(g) for g in groups]
    assert sizes[0] < CFG.ttt_doc_batch and CFG.ttt_doc_batch in sizes[1:]  # the short batch runs first
    seen = []
    run_batch = phased.run_batch
    monkeypatch.setattr(phased, "run_batch",
                        lambda model, lora, *a, **k: seen.append(lora.slots[0].q.A.detach().clone()) or
                        run_batch(model, lora, *a, **k))
    run_phased()
    first = phased.DocLoRA(tiny_model(1), CFG.ttt_doc_batch, CFG, torch.Generator().manual_seed(CFG.ttt_seed))
    start = first.slots[0].q.A.detach()  # the adapters as eval_phased builds them, before any batch
    assert not torch.equal(seen[0], start)  # the short batch: freshly drawn
    torch.testing.assert_close(seen[1], start, rtol=0, atol=0)  # the next batch: the carried A, untouched
    assert not torch.equal(seen[2], start)  # and after a full batch, the trained A carries on


@pytest.mark.parametrize("j", [12, 57, 100, 160, 233])
def test_changing_a_token_never_moves_an_earlier_or_another_documents_score(j):
    """tokens[j] (never a BOS, never made one) is the label of target j-1: targets before it in its
    document, the other documents of its batch and every earlier batch score the same; its own
    document's next chunk moves."""
    tokens = toks()
    if tokens[j] == BOS:
        j += 1
    other_t = tokens.copy()
    other_t[j] = (int(tokens[j]) + 17) % 62 + 2
    base, other = run_phased(tokens=tokens).per_target, run_phased(tokens=other_t).per_target
    docs = phased.documents(tokens, BOS)
    groups = phased.batches(docs, CFG.ttt_doc_batch)
    d = doc_of(tokens)[j - 1]
    g = next(i for i, grp in enumerate(groups) if d in grp)
    same = np.zeros(N - 1, dtype=bool)
    for grp in groups[:g + 1]:
        for e in grp:
            s, n = docs[e]
            same[s:s + n - 1] = e != d
    same[docs[d, 0]:j - 1] = True  # its own document before target j-1
    torch.testing.assert_close(other[same], base[same], atol=1e-6, rtol=0)
    s, n = docs[d]
    nxt = s + ((j - 1 - s) // CFG.ttt_doc_chunk + 1) * CFG.ttt_doc_chunk  # its next chunk's first target
    if nxt < s + n - 1:
        assert (other[nxt:s + n - 1] - base[nxt:s + n - 1]).abs().max() > 1e-4


def test_the_global_pass_trains_after_the_prefix_and_moves_only_later_documents():
    tokens = toks()
    docs = phased.documents(tokens, BOS)
    groups = phased.batches(docs, CFG.ttt_doc_batch)
    cfg = dataclasses.replace(CFG, ttt_prefix_docs=4, ttt_keep_a=False)
    (last, count), = phased.phase_ends(groups, 4, 1)
    r, plain = run_phased(cfg), run_phased(dataclasses.replace(cfg, ttt_prefix_docs=0))
    assert r.global_steps > 0 and plain.global_steps == 0 and count == 4
    before = np.zeros(N - 1, dtype=bool)
    for grp in groups[:last + 1]:
        for e in grp:
            s, n = docs[e]
            before[s:s + n - 1] = True
    torch.testing.assert_close(r.per_target[before], plain.per_target[before], atol=1e-6, rtol=0)
    assert (r.per_target[~before] - plain.per_target[~before]).abs().max() > 1e-3
    # a token of a document scored after the pass cannot reach the prefix's scores
    late = next(i for i in range(1, N) if not before[i - 1] and tokens[i] != BOS)
    t2 = tokens.copy()
    t2[late] = (int(tokens[late]) + 17) % 62 + 2
    torch.testing.assert_close(run_phased(cfg, tokens=t2).per_target[before], r.per_target[before], atol=1e-6, rtol=0)


def test_the_global_pass_sees_only_documents_already_scored(monkeypatch):
    """When each pass runs, every document it trains on (PR #2135's order) was scored before."""
    tokens = toks()
    scored, seen = set(), []
    run_batch, global_pass = phased.run_batch, phased.global_pass

    def batch_spy(model, lora, opt, tok, rows, *a, **k):
        out = run_batch(model, lora, opt, tok, rows, *a, **k)
        scored.update(map(tuple, rows.tolist()))
        return out

    def pass_spy(model, tok, chosen, *a, **k):
        seen.append((len(chosen), {tuple(r) for r in chosen.tolist()} <= scored))
        return global_pass(model, tok, chosen, *a, **k)

    monkeypatch.setattr(phased, "run_batch", batch_spy)
    monkeypatch.setattr(phased, "global_pass", pass_spy)
    r = phased.eval_phased(tiny_model(1), tokens, tiny_tables(), dataclasses.replace(CFG, ttt_prefix_docs=6, ttt_phases=2),
                           "cpu", bos_id=BOS)
    assert seen == [(3, True), (6, True)] and r.global_steps > 0


# ----------------------------------------------------------------------------- adapters, ranks


def test_q_k_v_and_head_adapters_equal_merged_weights_row_by_row():
    model = tiny_model(2)
    cfg = dataclasses.replace(CFG, ttt_sites=("q", "k", "v", "head"))
    lora = phased.DocLoRA(model, 2, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    x = torch.from_numpy(toks()[:24].astype(np.int64)).view(2, 12)
    with torch.no_grad():
        got = model.logits_from_hidden(model.forward_hidden(x, lora=lora), lora=lora)  # (2, 12, V)
        L = model.cfg.num_layers
        for b in range(2):
            merged = tiny_model(2)
            for pos in range(L):  # no loops: slot pos is layer pos
                for site, (bank, half) in (("q", ("qo_bank", 0)), ("k", ("kv_bank", 0)), ("v", ("kv_bank", 1))):
                    ad = getattr(lora[pos], site)
                    getattr(merged, bank)[half * L + pos] += ad.scale * ad.B[b] @ ad.A[b]
            h = merged.forward_hidden(x[b:b + 1])
            head = lora.head
            logits = F.linear(h, merged.tok_emb.weight) + head.scale * h @ head.A[b].T @ head.B[b].T
            want = softcap(logits, merged.cfg.logit_softcap, merged.cfg.logit_softcap_neg)
            torch.testing.assert_close(got[b:b + 1], want, atol=1e-5, rtol=1e-5)


def test_ranks_split_the_batches_and_together_score_every_target_once():
    r0, r1 = run_phased(rank=0, world=2), run_phased(rank=1, world=2)
    done0, done1 = r0.per_target != 0, r1.per_target != 0
    assert not (done0 & done1).any() and (done0 | done1).all()


# ----------------------------------------------------------------------------- stage, params


def test_run_reports_the_phased_score_beside_the_plain_one(tmp_path):
    root = make_workdir(tmp_path, tiny_model(8), lossless=True)
    cfg = dataclasses.replace(CFG, context=16, stride=4, batch_seqs=4, max_tokens=200, ttt_prefix_docs=2)
    m = run(cfg, paths(root), progress=False)
    model, _ = load_model(root / "artifacts/final/model.ptz")
    ref = phased.eval_phased(model, val_tokens(root), wd_tables(), cfg, "cpu")
    plain = bpb.eval_sliding(tiny_model(8), val_tokens(root), wd_tables(), 16, 4, 4, "cpu")
    assert m["val_bpb"] == pytest.approx(ref.val_bpb, abs=1e-12) and m["val_bpb_pre_ttt"] == pytest.approx(
        plain["val_bpb"], abs=1e-12)
    assert m["ttt_scheme"] == "phased" and m["ttt_docs"] == ref.docs and m["ttt_global_steps"] == ref.global_steps
    assert m["scored_tokens"] == ref.scored_tokens == plain["scored_tokens"]


def test_run_with_the_tilt_reports_the_untilted_phased_score_of_a_run_without_it(tmp_path):
    root = make_workdir(tmp_path, tiny_model(8), lossless=True)
    cfg = dataclasses.replace(CFG, max_tokens=200, ttt_prefix_docs=2)
    off = run(cfg, paths(root), progress=False)
    on = run(dataclasses.replace(cfg, ngram_tilt=True, ngram_order=2, ngram_threshold=0.3), paths(root), progress=False)
    assert on["val_bpb_untilted"] == pytest.approx(off["val_bpb"], abs=1e-12) != on["val_bpb"]
    assert on["val_loss_untilted"] == pytest.approx(off["val_loss"], abs=1e-12)


def test_stage_under_torchrun_two_ranks_with_uneven_global_sequences(tmp_path):
    """2 gloo ranks: batches dealt round-robin; the global pass (after the first batch: documents of 8
    and 38 tokens) has 2 trained chunks of one 16-token sequence, which falls to rank 1 alone: both
    ranks take a step per chunk (rank 0 with zero gradients), so the collectives pair up and the
    stage ends."""
    import yaml

    root = make_workdir(tmp_path, tiny_model(9), nproc=2)
    doc = yaml.safe_load(PARAMS.format(nproc=2))
    doc["evaluate"].update({"ttt_enabled": True, "ttt_scheme": "phased", "ttt_rank": 2, "ttt_lr": 0.05,
                            "ttt_optimizer": "adam", "ttt_alpha": 8.0, "ttt_doc_batch": 2, "ttt_doc_chunk": 5,
                            "ttt_prefix_docs": 2, "ttt_global_chunk_tokens": 16, "ttt_global_batch_seqs": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    gate(root)
    m = run_stage(root)
    assert m["world_size"] == 2 and m["ttt_scheme"] == "phased" and m["ttt_global_steps"] == 2
    assert m["scored_tokens"] == 192 and m["val_bpb"] != m["val_bpb_pre_ttt"]


@pytest.mark.parametrize("over,message", [
    ({"ttt_scheme": "perdoc"}, "evaluate.ttt_scheme must be one of stream, phased"),
    ({"ttt_sites": ("q", "gate")}, "evaluate.ttt_sites must list distinct names among q, k, v, o, mlp, head"),
    ({"ttt_doc_chunk": 0}, "evaluate.ttt_doc_chunk must be >= 1"),
    ({"ttt_global_chunk_tokens": 8}, "evaluate.ttt_global_chunk_tokens must be >= evaluate.context (16)"),
    ({"ttt_global_momentum": 1.0}, "evaluate.ttt_global_momentum must be in [0, 1)"),
])
def test_bad_phased_params_are_named(over, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(dataclasses.replace(CFG, **over))
