"""pgolf.shared.bpb: val_bpb against a hand computation (one full forward per target), the sliding
window set (every target scored exactly once, enough context, the reference's tail duplicates
quantified on the spec's numbers), truncation, batching/rank-split invariance, val shards."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CROSS_PATH_RTOL, MICRO_CFG, tiny_model
from pgolf.shared import bpb
from pgolf.shared.byte_tables import ByteTables
from pgolf.shared.shards import write_shard



def tiny_tables(V=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 5, (V,), generator=g)
    space = torch.rand(V, generator=g) < 0.4
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[:2] = True
    base[:2] = 0
    space[:2] = False
    return ByteTables(base, space, boundary)


def tiny_tokens(n, V=64, seed=3):
    rng = np.random.default_rng(seed)
    t = rng.integers(2, V, n).astype(np.uint16)
    t[rng.random(n) < 0.05] = 1  # a few BOS
    t[0] = 1
    return t


def naive_sums(model, tokens, windows, tables):
    """Sum NLL / bytes target by target: one unpadded forward of the exact context per target."""
    nll, nbytes, n = 0.0, 0, 0
    tok = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        for s, length, first in windows:
            for p in range(first, length):
                ctx = tok[s:s + p + 1][None]  # (1, p+1)
                logits = model.forward_logits(ctx)[0, -1]  # (V,)
                y = tok[s + p + 1]
                nll += float(F.cross_entropy(logits[None].double(), y[None]))
                nbytes += int(tables.count(tok[s + p][None], y[None]))
                n += 1
    return nll, nbytes, n


# ----------------------------------------------------------------------------- window sets


@pytest.mark.parametrize("T,context,stride", [
    (200, 32, 8), (203, 32, 8), (201, 32, 7), (37, 32, 8), (20, 32, 8), (32, 32, 8), (33, 32, 8),
    (1, 16, 4), (1000, 64, 64), (1001, 64, 1), (97, 16, 16), (5, 16, 16)])
def test_sliding_windows_score_each_target_once(T, context, stride):
    w = bpb.sliding_windows(T, context, stride)
    np.testing.assert_array_equal(bpb.scored_positions(w), np.arange(T))
    starts, lengths, first = w[:, 0], w[:, 1], w[:, 2]
    assert (starts >= 0).all() and (starts + lengths <= T).all() and (lengths <= context).all()
    assert (first < lengths).all() and (first >= 0).all()
    # context of a scored target = its window position + 1: all its history up to `context`,
    # and never less than context - stride + 1 once that much history exists
    for s, n, f in w:
        for p in range(f, n):
            j = s + p
            assert p + 1 >= min(j + 1, context - stride + 1)
    # only windows that score something, and no more than ceil((T - context)/stride) + 1
    assert len(w) == 1 + max(0, math.ceil((T - context) / stride))


def reference_windows(T, context, stride):
    """The reference scripts' window set (spec §2.4): every multiple of stride in [0, T)."""
    rows = []
    for w in range(0, T, stride):
        wlen = min(context, T - w)
        rows.append((w, wlen, 0 if w == 0 else max(wlen - stride, 0)))
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("T,context,stride", [(200, 32, 8), (203, 32, 7), (20, 32, 8)])
def test_reference_window_set_only_adds_tail_duplicates(T, context, stride):
    ours = bpb.scored_positions(bpb.sliding_windows(T, context, stride))
    ref = bpb.scored_positions(reference_windows(T, context, stride))
    assert set(ref.tolist()) == set(ours.tolist())
    dup = np.unique(ref[np.r_[False, ref[1:] == ref[:-1]]])
    assert dup.size == 0 or dup.min() >= T - context  # duplicates only in the tail


@pytest.mark.parametrize("stride,ref_tokens,ref_windows", [(64, 62_023_616, 969_088), (16, 62_023_664, 3_876_352)])
def test_spec_tail_duplicate_counts(stride, ref_tokens, ref_windows):
    """Spec §2.4: the reference counts 62,023,616 (stride 64) / 62,023,664 (stride 16) targets
    over 969,088 / 3,876,352 windows for T = 62,021,632; we score T exactly."""
    T, ctx = 62_021_632, 2048
    starts = np.arange(0, T, stride, dtype=np.int64)
    wlen = np.minimum(ctx, T - starts)
    counted = wlen[0] + np.minimum(stride, wlen[1:]).sum()
    assert (len(starts), int(counted)) == (ref_windows, ref_tokens)
    ours = bpb.sliding_windows(T, ctx, stride)
    assert int((ours[:, 1] - ours[:, 2]).sum()) == T
    assert len(ours) == 1 + (T - ctx) // stride


def test_nonsliding_truncation_rule():
    t = np.arange(100, dtype=np.uint16)
    assert len(bpb.truncate(t, 16)) == 97  # ((100-1)//16)*16 + 1
    assert len(bpb.truncate(t[:17], 16)) == 17
    with pytest.raises(ValueError, match="fewer than one sequence"):
        bpb.truncate(t[:16], 16)


# ----------------------------------------------------------------------------- scoring numbers


def test_nonsliding_matches_hand_computation():
    model, tables, tokens = tiny_model(), tiny_tables(), tiny_tokens(16 * 3 + 5)
    got = bpb.eval_nonsliding(model, tokens, tables, seq_len=16, batch_seqs=2, device="cpu")
    windows = bpb.nonsliding_windows(48, 16)
    nll, nbytes, n = naive_sums(model, tokens[:49], windows, tables)
    assert (got["tokens"], got["bytes"]) == (n, nbytes) == (48, tables.stream_bytes(tokens[:49]))
    assert got["val_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["val_bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)


def test_nonsliding_within_documents_matches_each_segment_scored_alone():
    """doc_backend: each batch of windows is one row of the stream, cut at the row's start and at
    every BOS (documents here are shorter than seq_len). With no BigramHash and SmearGate masked at
    BOS, nothing crosses a cut, so the score is each segment's own dense forward from position 0,
    its targets the tokens after its inputs; dense windows score differently."""
    cfg = dataclasses.replace(MICRO_CFG, bigram_buckets=0, smear_bos_mask=True)
    model, tables = tiny_model(4, cfg), tiny_tables()
    rng = np.random.default_rng(12)  # no BOS at the rows' starts 32 and 64
    tokens = rng.integers(2, 64, 16 * 6 + 1).astype(np.uint16)
    bos = np.cumsum(rng.integers(3, 13, 20))
    tokens[np.concatenate([[0], bos[bos < len(tokens)]])] = 1  # documents of 3..12 tokens
    got = bpb.eval_nonsliding(model, tokens, tables, seq_len=16, batch_seqs=2, device="cpu", doc_backend="reference")
    cuts = sorted(set(range(0, 96, 32)) | set(np.flatnonzero(tokens[:96] == 1).tolist()))  # rows of 2 x 16
    nll, tok = 0.0, torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        for a, b in zip(cuts, cuts[1:] + [96]):
            logits = model.forward_logits(tok[a:b][None])[0]  # (b-a, V)
            nll += float(F.cross_entropy(logits.double(), tok[a + 1:b + 1], reduction="sum"))
    assert got["tokens"] == 96 and got["bytes"] == tables.stream_bytes(tokens)
    assert got["val_loss"] == pytest.approx(nll / 96, rel=1e-5)
    dense = bpb.eval_nonsliding(model, tokens, tables, seq_len=16, batch_seqs=2, device="cpu")
    assert abs(dense["val_loss"] - got["val_loss"]) > 1e-3
    with pytest.raises(ValueError, match="non-sliding windows"):
        bpb.score_windows(model, tokens, bpb.sliding_windows(96, 16, 4), 16, tables, 2, "cpu", doc_backend="reference")


@pytest.mark.parametrize("N,context,stride,batch", [(60, 16, 4, 3), (45, 16, 16, 2), (12, 16, 4, 4), (50, 16, 5, 32)])
def test_sliding_matches_hand_computation(N, context, stride, batch):
    model, tables, tokens = tiny_model(1), tiny_tables(seed=1), tiny_tokens(N, seed=N)
    got = bpb.eval_sliding(model, tokens, tables, context=context, stride=stride, batch_seqs=batch, device="cpu")
    windows = bpb.sliding_windows(N - 1, context, stride)
    nll, nbytes, n = naive_sums(model, tokens, windows, tables)
    assert got["scored_tokens"] == n == N - 1
    assert got["scored_bytes"] == nbytes == tables.stream_bytes(tokens)
    assert got["windows"] == len(windows)
    assert got["val_bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
    assert got["val_loss"] == pytest.approx(nll / n, rel=1e-5)


def test_stride_equal_context_is_nonsliding():
    model, tables, tokens = tiny_model(2), tiny_tables(), tiny_tokens(16 * 4 + 1)
    a = bpb.eval_nonsliding(model, tokens, tables, 16, 3, "cpu")
    b = bpb.eval_sliding(model, tokens, tables, 16, 16, 3, "cpu")
    assert b["val_bpb"] == pytest.approx(a["val_bpb"], rel=CROSS_PATH_RTOL) and b["scored_tokens"] == a["tokens"]


def test_rank_split_sums_to_whole():
    """Windows split contiguously over ranks: the per-rank sums (no process group) add up."""
    model, tables, tokens = tiny_model(3), tiny_tables(), tiny_tokens(90)
    windows = bpb.sliding_windows(89, 16, 4)
    whole = bpb.score_windows(model, tokens, windows, 16, tables, 4, "cpu")
    parts = [bpb.score_windows(model, tokens, windows, 16, tables, 4, "cpu", rank=r, world=3) for r in range(3)]
    assert sum(p["tokens"] for p in parts) == whole["tokens"] == 89
    assert sum(p["windows"] for p in parts) == len(windows)
    assert sum(p["bytes"] for p in parts) == whole["bytes"]
    assert sum(p["nll"] for p in parts) == pytest.approx(whole["nll"], rel=CROSS_PATH_RTOL)


def test_token_outside_vocab_is_an_error():
    model, tables, tokens = tiny_model(), tiny_tables(), tiny_tokens(40)
    tokens[5] = 64
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpb.eval_sliding(model, tokens, tables, 16, 4, 4, "cpu")


def test_load_val_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(10, 20))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5))
    t = bpb.load_val_tokens(tmp_path)
    assert t.dtype == np.uint16 and t.tolist() == list(range(20))
    assert bpb.load_val_tokens(tmp_path, max_tokens=7).tolist() == list(range(8))


@pytest.mark.gpu
def test_cuda_compiled_bf16_matches_cpu_fp32():
    """The CUDA path (bf16 autocast, torch.compile, padded fixed-shape batches) against the CPU fp32
    eager numbers of the same model: same counts, bpb within bf16 noise."""
    model, tables, tokens = tiny_model(4), tiny_tables(), tiny_tokens(16 * 20 + 7)
    ref = bpb.eval_sliding(model, tokens, tables, 16, 4, 8, "cpu")
    got = bpb.eval_sliding(model.cuda(), tokens, tables, 16, 4, 8, "cuda", compile=True)
    assert (got["scored_tokens"], got["scored_bytes"], got["windows"]) == \
        (ref["scored_tokens"], ref["scored_bytes"], ref["windows"])
    assert got["val_bpb"] == pytest.approx(ref["val_bpb"], rel=2e-2)
    flat = bpb.eval_nonsliding(model, tokens, tables, 16, 8, "cuda", compile=True)
    assert flat["val_bpb"] == pytest.approx(bpb.eval_nonsliding(model.cpu(), tokens, tables, 16, 8, "cpu")["val_bpb"],
                                            rel=2e-2)


def test_warm_up_compiles_nothing_off_cuda():
    assert bpb.warm_up(tiny_model(2), 16, 8, "cpu", compile=True) == 0.0


@pytest.mark.gpu
def test_warm_up_compiles_the_passes_graph_once():
    """After the warm-up on (batch_seqs, width) both passes reuse its graph: no recompilation."""
    model, tables, tokens = tiny_model(4).cuda(), tiny_tables(), tiny_tokens(16 * 20 + 7)
    assert bpb.warm_up(model, 16, 8, "cuda", compile=True) > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        bpb.eval_nonsliding(model, tokens, tables, 16, 8, "cuda", compile=True)
        bpb.eval_sliding(model, tokens, tables, 16, 4, 8, "cuda", compile=True)
