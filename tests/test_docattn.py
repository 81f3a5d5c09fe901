"""pgolf.shared.docattn (train.doc_packing): the cu_seqlens builder against hand examples and the
PR #2135 script's builder, the reference backend against plain attention with an explicit
block-diagonal causal mask (forward and backward), the flex block mask against torch's own
create_block_mask and flex's forward against the reference (FlexAttention has no CPU backward), the
varlen call against each varlen_attn signature, per-segment RoPE positions against whole-row ones,
the model with packed rows (no attention across documents; one document = the dense forward; one
compiled graph whatever the number of segments), the packed loader on a hand-made shard, and a
training step in the packed layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf import config
from pgolf.config import ModelConfig
from pgolf.shared import bpb
from pgolf.shared import docattn as D
from pgolf.shared.model import GPT, apply_rotary
from pgolf.shared.shards import BOS_ID, write_shard
from pgolf.train.loader import DistributedTokenLoader

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def masked_attention(q, k, v, seg):
    """The oracle: q (n, H, hd), k/v (n, Hkv, hd), seg (n,) -> SDPA with the full (n, n) mask
    'same segment and key <= query'."""
    n = q.size(0)
    mask = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask, enable_gqa=True)
    return y.transpose(0, 1)


def seg_of(cu, n):
    """Segment id of every token from the (padded) cu_seqlens, by a Python loop."""
    seg = np.zeros(n, dtype=np.int64)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        seg[a:b] = i
    return torch.from_numpy(seg)


def qkv(n, H=4, Hkv=2, hd=8, seed=0, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, hd, generator=g, dtype=dtype).requires_grad_(grad) for h in (H, Hkv, Hkv)]


# ----------------------------------------------------------------------------- cu_seqlens


def test_cu_seqlens_by_hand():
    # documents at 0, 5, 40, 41, 300 in 500 tokens, at most 128 per segment: 41..300 (259 tokens)
    # splits at 169 and 297, 300..500 at 428; 9 boundaries padded with 500 to 16 entries
    cu = D.build_cu_seqlens([300, 5, 40, 41, 0, 40], 500, 128, bucket=8)
    assert cu.dtype == np.int32
    assert cu.tolist() == [0, 5, 40, 41, 169, 297, 300, 428, 500] + [500] * 7
    assert D.segment_lengths(cu).tolist() == [5, 35, 1, 128, 128, 3, 128, 72]


def test_cu_seqlens_of_a_row_begun_mid_document_and_padding_to_the_bucket():
    # no BOS at 0: the row's first tokens (the end of a document of the previous row) are a
    # segment of their own, cut every max_len from the row's start
    assert D.build_cu_seqlens([7], 20, 3, bucket=4).tolist() == [0, 3, 6, 7, 10, 13, 16, 19, 20, 20, 20, 20]
    assert D.build_cu_seqlens([], 8, 8, bucket=64).tolist() == [0, 8] + [8] * 62  # one segment
    assert D.build_cu_seqlens([], 16, 8, bucket=3).tolist() == [0, 8, 16]  # a full bucket: no padding
    assert D.doc_starts(np.array([1, 5, 1, 1, 9]), bos_id=1).tolist() == [0, 2, 3]
    assert D.doc_starts(np.array([BOS_ID, 2])).tolist() == [0]


def test_cu_seqlens_equal_pr2135s_on_random_rows():
    """The builder against the record script's own (../shared/anchors/pr2135, test-only): the same
    boundaries, the same padding to 64 entries, for rows with and without a BOS at 0."""
    from _anchors import load_script

    record = load_script("pr2135", {})
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, max_len = int(rng.integers(1, 3000)), int(rng.choice([7, 64, 2048]))
        starts = sorted(set(rng.integers(0, n, int(rng.integers(0, 60))).tolist()) | ({0} if trial % 2 else set()))
        theirs, _ = record._build_cu_seqlens(list(starts), n, "cpu", max_len, 64)
        assert D.build_cu_seqlens(starts, n, max_len).tolist() == theirs.tolist(), (starts, n, max_len)


@pytest.mark.parametrize("starts,n,max_len,why", [([5], 5, 4, "must lie in"), ([0], 0, 4, ">= 1"),
                                                   ([0], 4, 0, ">= 1")])
def test_cu_seqlens_rejects_bad_rows(starts, n, max_len, why):
    with pytest.raises(ValueError, match=why):
        D.build_cu_seqlens(starts, n, max_len)


def test_segments_ids_and_positions_and_the_cu_check():
    cu = D.build_cu_seqlens([0, 3, 4], 10, 4, bucket=8)  # [0, 3, 4, 8, 10, 10, 10, 10]
    docs = D.segments(torch.from_numpy(cu), 10, 4)
    assert docs.seg_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
    assert docs.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 0, 1]
    assert docs.n == 10 and docs.max_len == 4 and docs.block_mask is None
    with pytest.raises(ValueError, match="longer than max_len 3"):
        D.segments(torch.from_numpy(cu), 10, 3)
    with pytest.raises(ValueError, match="from 0 to 11"):
        D.segments(torch.from_numpy(cu), 11, 4)
    with pytest.raises(ValueError, match="not one of"):
        D.segments(torch.from_numpy(cu), 10, 4, "dense")


# ----------------------------------------------------------------------------- the reference backend

LAYOUTS = {  # name: (BOS positions, n, max_len)
    "one segment": ([0], 24, 32),
    "several documents": ([0, 5, 6, 19, 31], 40, 16),
    "a document longer than max_len": ([0, 3], 50, 8),  # 3..50 cut at 11, 19, ...
    "row begun mid-document, n not a multiple": ([13, 14], 37, 10),
    "max_len 1": ([0, 2], 6, 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_equals_explicitly_masked_attention_forward_and_backward(layout):
    starts, n, max_len = LAYOUTS[layout]
    cu = D.build_cu_seqlens(starts, n, max_len, bucket=8)  # padded: empty segments at the end
    assert cu[-1] == n and (np.diff(cu) <= max_len).all()
    docs = D.segments(torch.from_numpy(cu), n, max_len)
    q, k, v = qkv(n)
    y = D.doc_attention(q, k, v, docs)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = masked_attention(q2, k2, v2, seg_of(cu, n))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_reference_under_fp32_and_a_cpu_autocast_dtype():
    cu = D.build_cu_seqlens([0, 9], 30, 12)
    docs = D.segments(torch.from_numpy(cu), 30, 12)
    q, k, v = qkv(30, dtype=torch.float32, grad=False)
    ref = masked_attention(q, k, v, seg_of(cu, 30))
    torch.testing.assert_close(D.doc_attention(q, k, v, docs), ref, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = D.doc_attention(q, k.bfloat16(), v, docs)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=3e-2)


def test_rope_restarting_per_segment_equals_whole_row_positions():
    """RoPE is relative: rotating q and k at whole-row positions (the record's layout, unscaled
    base) or at positions restarting in each segment gives the same attention within segments."""
    starts, n, max_len = [0, 7, 20], 48, 16
    cu = D.build_cu_seqlens(starts, n, max_len)
    docs = D.segments(torch.from_numpy(cu), n, max_len)
    rd, base = 8, 10000.0
    inv = 1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)

    def rot(x, pos):  # x (n, h, hd) -> rotated at positions pos (n,)
        f = pos.double()[:, None] * inv[None]  # (n, rd/2)
        return apply_rotary(x[None], f.cos(), f.sin())[0]

    q, k, v = qkv(n, hd=16, grad=False)
    whole = torch.arange(n)
    per_segment = docs.positions
    assert per_segment.max() < max_len <= n
    a = D.doc_attention(rot(q, whole), rot(k, whole), v, docs)
    b = D.doc_attention(rot(q, per_segment), rot(k, per_segment), v, docs)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- flex


FLEX_LAYOUTS = {  # BOS positions, n, max_len: with full blocks (segments spanning whole 16-blocks)
    "long documents": ([0, 70], 160, 64),
    "short documents": (list(range(0, 160, 9)), 160, 64),
    "n not a multiple of the block": ([0, 40], 150, 100),
}


@pytest.mark.parametrize("layout", FLEX_LAYOUTS)
def test_flex_block_mask_matches_create_block_mask(layout):
    from torch.nn.attention.flex_attention import create_block_mask

    starts, n, max_len = FLEX_LAYOUTS[layout]
    docs = D.segments(torch.from_numpy(D.build_cu_seqlens(starts, n, max_len)), n, max_len)
    mine = D.flex_block_mask(docs.seg_ids, block=16)
    seg = F.pad(docs.seg_ids.long(), (0, 16 - n % 16 if n % 16 else 0), value=-1)
    theirs = create_block_mask(lambda b, h, qi, ki: (seg[qi] == seg[ki]) & (qi >= ki), None, None, n, n,
                               device="cpu", BLOCK_SIZE=16)
    assert torch.equal(mine.to_dense(), theirs.to_dense())  # partial + full blocks
    assert torch.equal(mine.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(mine.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert int(mine.full_kv_num_blocks.sum()) > 0 or layout == "short documents"


@pytest.mark.parametrize("layout", ["several documents", "a document longer than max_len",
                                    "row begun mid-document, n not a multiple"])
def test_flex_forward_equals_the_reference_on_cpu(layout):
    """FlexAttention runs eagerly on a CPU, forward only (torch 2.13 has no CPU backward)."""
    starts, n, max_len = LAYOUTS[layout]
    cu = torch.from_numpy(D.build_cu_seqlens(starts, n, max_len))
    flex, ref = D.segments(cu, n, max_len, "flex"), D.segments(cu, n, max_len, "reference")
    assert flex.block_mask is not None
    q, k, v = qkv(n, dtype=torch.float32, grad=False)
    with torch.no_grad():
        torch.testing.assert_close(D.flex_attention_docs(q, k, v, flex), D.doc_attention(q, k, v, ref),
                                   rtol=1e-5, atol=1e-6)


def test_compiled_flex_serves_every_row_with_one_graph():
    """Each micro-batch brings a new BlockMask whose mask_mod is a new closure over new segment
    ids; the compiled graph guards on the closure's code, so it is reused (aot_eager, no grad)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, docs: docs.attend(q, k, v), backend="aot_eager", fullgraph=True, dynamic=False)
    before = counters["stats"]["unique_graphs"]
    for starts in ([0, 70], list(range(0, 256, 9))):
        cu = torch.from_numpy(D.build_cu_seqlens(starts, 256, 64))
        q, k, v = (t[None] for t in qkv(256, dtype=torch.float32, grad=False))
        with torch.no_grad():
            torch.testing.assert_close(fn(q, k, v, D.segments(cu, 256, 64, "flex")),
                                       D.segments(cu, 256, 64).attend(q, k, v), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - before == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("signature", ["2.10", "2.11", "2.12"])
def test_varlen_call_adapts_to_the_signature_of_this_torchs_varlen_attn(monkeypatch, signature):
    """varlen_attn's keywords changed across torch releases: is_causal (2.10), window_size (-1, 0)
    (2.11), enable_gqa (2.12 on; before it, K/V are repeated to the query heads). A stand-in with
    each signature computes the segments' attention from what it is given."""
    import torch.nn.attention.varlen as V

    seen = {}

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, causal, gqa):
        assert torch.equal(cu_q, cu_k) and max_q == max_k == 12 and causal
        assert gqa or k.size(1) == q.size(1)
        seen.update(heads=k.size(1))
        return masked_attention(q, k, v, seg_of(cu_q.tolist(), q.size(0)))

    fakes = {
        "2.10": lambda q, k, v, cq, ck, mq, mk, is_causal=False, return_aux=None: attend(q, k, v, cq, ck, mq, mk,
                                                                                         is_causal, False),
        "2.11": lambda q, k, v, cq, ck, mq, mk, *, return_aux=None, scale=None, window_size=(-1, -1): attend(
            q, k, v, cq, ck, mq, mk, tuple(window_size) == (-1, 0), False),
        "2.12": lambda q, k, v, cq, ck, mq, mk, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False:
            attend(q, k, v, cq, ck, mq, mk, tuple(window_size) == (-1, 0), enable_gqa),
    }
    monkeypatch.setattr(V, "varlen_attn", fakes[signature])
    monkeypatch.setattr(D, "_VARLEN_SIG", None)
    cu = D.build_cu_seqlens([0, 5, 20], 30, 12)
    docs = D.segments(torch.from_numpy(cu), 30, 12)
    q, k, v = qkv(30, grad=False)
    torch.testing.assert_close(D.varlen_attention(q, k, v, docs), masked_attention(q, k, v, seg_of(cu, 30)))
    assert seen["heads"] == (2 if signature == "2.12" else 4)


@pytest.mark.parametrize("gqa", [False, True])
def test_flash_impl_call_asks_for_causal_without_a_window(monkeypatch, gqa):
    """fa4 / fa3 reach varlen_attn's op with is_causal and window (-1, -1): FA4's SM90 backward
    refuses the right window of 0 that varlen_attn's (-1, 0) becomes. A stand-in op computes the
    segments' attention from what it is given; K/V are repeated where enable_gqa is not there."""
    import torch.nn.attention.varlen  # noqa: F401 - registers torch.ops.torch_attn

    seen = {}

    def op(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, *rest):
        assert torch.equal(cu_q, cu_k) and max_q == max_k == 12 and scale is None
        assert is_causal is True and list(window) == [-1, -1] and list(rest) == ([True] if gqa else [])
        seen.update(heads=k.size(1))
        out = masked_attention(q, k, v, seg_of(cu_q.tolist(), q.size(0)))
        return out, None, None

    monkeypatch.setattr(torch.ops.torch_attn, "_varlen_attn", op)
    monkeypatch.setattr(D, "_VARLEN_SIG", (True, gqa))
    cu = D.build_cu_seqlens([0, 5, 20], 30, 12)
    docs = D.segments(torch.from_numpy(cu), 30, 12)
    q, k, v = qkv(30, grad=False)
    torch.testing.assert_close(D.flash_impl_attention(q, k, v, docs), masked_attention(q, k, v, seg_of(cu, 30)))
    assert seen["heads"] == (2 if gqa else 4)


def test_backend_resolution_on_cpu():
    assert D.resolve("auto", "cpu") == "reference"
    assert D.resolve("reference", "cpu") == "reference"
    assert D.available("cpu") == ["reference"]
    for name in ("varlen", "flex", "fa4", "fa3"):
        with pytest.raises(ValueError, match="cannot train on cpu"):
            D.resolve(name, "cpu")
    with pytest.raises(ValueError, match="not one of"):
        D.resolve("dense", "cpu")
    assert set(D.BACKENDS) | {"auto"} == set(config.DOC_ATTN_BACKENDS) and set(D.AUTO_ORDER) <= set(D.BACKENDS)
    with pytest.raises(config.ConfigError, match="train.doc_attn_backend must be one of"):
        config.from_dict("train", {"doc_attn_backend": "flash", "nproc_per_node": 1})


def test_attention_flops_count_each_segments_causal_pairs():
    cu = D.build_cu_seqlens([0, 4], 10, 8)  # segments of 4 and 6 tokens
    assert D.attention_flops(cu, hd=2, heads=3, fwd_bwd=False) == (10 + 21) * 2 * 2 * 3 * 2


# ----------------------------------------------------------------------------- the model

MODEL = ModelConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3,
                    xsa_last_n=3, bigram_buckets=31, bigram_dim=8, ve_dim=8, ve_last_n=1, rope_dims=4,
                    residual_dtype="fp32", smear_bos_mask=True, attn_gate_window=8, parallel_start_layer=2)


def make_model(cfg=MODEL, seq_len=16):
    torch.manual_seed(0)
    m = GPT(config.check(cfg), train_seq_len=seq_len)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def row(n=48, bos=(0, 13, 30), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (1, n), generator=g)
    ids[0, list(bos)] = BOS_ID
    return ids


def test_no_attention_across_documents():
    """Changing document A (tokens 14..28, all but its last token, so that the BigramHash pair and
    the SmearGate at B's BOS see the same previous token) leaves every logit of the next document B
    (30..47) unchanged with doc packing; with dense attention B's logits do change."""
    m = make_model()
    ids = row()
    other = ids.clone()
    other[0, 14:29] = torch.randint(2, 64, (15,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        packed = [m.logits_from_hidden(m.forward_hidden(x, None, D.segments_of_row(x[0], 16))) for x in (ids, other)]
        dense = [m.forward_logits(x) for x in (ids, other)]
    assert torch.equal(packed[0][0, 30:], packed[1][0, 30:])
    assert torch.equal(packed[0][0, :14], packed[1][0, :14])  # before the change (causality)
    assert (packed[0][0, 14:29] - packed[1][0, 14:29]).abs().amax() > 1e-3
    assert (dense[0][0, 30:] - dense[1][0, 30:]).abs().amax() > 1e-3


@pytest.mark.parametrize("n", [16, 11])
def test_one_document_packed_equals_the_dense_forward_and_gradients(n):
    """A row that is one document no longer than max_len: one segment from position 0, so the
    packed forward is the dense causal forward (same positions), loss and gradients too."""
    m = make_model()
    ids = row(n, bos=(0,))
    docs = D.segments_of_row(ids[0], 16)
    assert D.segment_lengths(docs.cu_seqlens).tolist() == [n]
    loss_p = m(ids, ids.roll(-1, 1), docs=docs)
    grads_p = torch.autograd.grad(loss_p, list(m.parameters()), allow_unused=True)
    loss_d = m(ids, ids.roll(-1, 1))
    grads_d = torch.autograd.grad(loss_d, list(m.parameters()), allow_unused=True)
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-6, atol=1e-7)
    for (name, _), a, b in zip(m.named_parameters(), grads_p, grads_d):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda s, name=name: f"{name}: {s}")


def test_packed_row_equals_its_documents_run_one_by_one():
    """With segments no longer than max_len, each document's hidden states in the packed row are
    its own dense forward's, except at its BOS and next token, where BigramHash and SmearGate read
    the previous document's last token (the model's front end, not attention)."""
    cfg = dataclasses.replace(MODEL, bigram_buckets=2, bigram_dim=1)
    m = make_model(cfg)
    with torch.no_grad():
        m.bigram.scale.zero_()  # no bigram term: only the SmearGate (BOS-masked) crosses documents
        ids = row(40, bos=(0, 9, 25))
        h = m.forward_hidden(ids, None, D.segments_of_row(ids[0], 16))
        for a, b in ((0, 9), (9, 25), (25, 40)):
            torch.testing.assert_close(h[0, a:b], m.forward_hidden(ids[:, a:b])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mark", [True, False])
def test_the_packed_forward_compiles_to_one_graph_for_any_number_of_segments(monkeypatch, mark):
    """Under torch.compile (fullgraph, dynamic=False, as train.compile) rows with 128 and 192
    cu_seqlens entries run the same graph: its length is marked dynamic (aot_eager on the CPU).
    The reference backend reads no cu_seqlens; here it reads them as varlen_attn does, so that
    the graph depends on their length (without the mark: a second graph)."""
    from torch._dynamo.utils import counters

    reference = D._ATTEND["reference"]
    monkeypatch.setitem(D._ATTEND, "reference",
                        lambda q, k, v, docs: reference(q, k, v, docs) + 0 * docs.cu_seqlens.sum().to(q.dtype))
    if not mark:
        monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", lambda *a, **kw: None)
    torch._dynamo.reset()
    m = make_model(dataclasses.replace(MODEL, parallel_start_layer=0, attn_gate_window=0), seq_len=8)
    fwd = torch.compile(m, dynamic=False, fullgraph=True, backend="aot_eager")
    before = counters["stats"]["unique_graphs"]
    layouts = ((0, 30), tuple(range(0, 640, 4)))  # 81 and 161 boundaries: 128 and 192 entries
    for bos in layouts:
        ids = row(640, bos=bos, seed=len(bos))
        docs = D.segments_of_row(ids[0], 8)
        loss = fwd(ids, ids.roll(-1, 1), docs=docs)
        torch.testing.assert_close(loss, m(ids, ids.roll(-1, 1), docs=docs), rtol=1e-5, atol=1e-6)
        loss.backward()
    assert [D.segments_of_row(row(640, bos=b, seed=len(b))[0], 8).cu_seqlens.numel() for b in layouts] == [128, 192]
    assert counters["stats"]["unique_graphs"] - before == (1 if mark else 2)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- loader and trainer


def test_packed_loader_rows_and_segments_on_a_hand_made_shard(tmp_path):
    toks = np.array([BOS_ID, 5, 6, 7, BOS_ID, 8, 9, 10, 11, 12, 13, BOS_ID, 14, 15, BOS_ID, 16, 17, 18], np.uint16)
    write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    a = DistributedTokenLoader([tmp_path / "fineweb_train_000000.bin"], 0, 1, "cpu")
    x, y, cu = a.next_packed(8, 4)
    assert x.tolist() == [toks[:8].tolist()] and y.tolist() == [toks[1:9].tolist()]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 4, 8] + [8] * 61
    x, y, cu = a.next_packed(8, 4)  # the next 9 tokens: 12 13 BOS 14 15 BOS 16 17 | 18
    assert x.tolist() == [toks[9:17].tolist()] and y.tolist() == [toks[10:18].tolist()]
    assert cu.tolist()[:5] == [0, 2, 5, 8, 8]
    # two ranks: disjoint spans of one stream, each with its own segments; same tokens as next_batch
    ranks = [DistributedTokenLoader([tmp_path / "fineweb_train_000000.bin"], r, 2, "cpu") for r in range(2)]
    dense = [DistributedTokenLoader([tmp_path / "fineweb_train_000000.bin"], r, 2, "cpu") for r in range(2)]
    for r in range(2):
        x, y, cu = ranks[r].next_packed(6, 3)
        xd, yd = dense[r].next_batch(6, 3)
        assert torch.equal(x.reshape(-1), xd.reshape(-1)) and torch.equal(y.reshape(-1), yd.reshape(-1))
        assert x.tolist() == [toks[7 * r:7 * r + 6].tolist()]
        assert cu.tolist()[:4] == ([0, 3, 4, 6] if r == 0 else [0, 3, 4, 6])  # rank 1: 10 11 12 13 BOS 14


def test_a_training_step_in_the_packed_layout(tmp_path):
    """The trainer with train.doc_packing: one row of micro_tokens per micro-batch and its segments
    (cut at seq_len), the loss the model gives them, and a finite update."""
    from pgolf.prepare.tokenizer import build_byte_tables, file_sha256, load_tokenizer
    from pgolf.shared import dist
    from pgolf.train import train as T

    root = Path(__file__).resolve().parents[1]
    toks = np.random.default_rng(0).integers(2, 1024, 6000)
    toks[::37] = BOS_ID
    write_shard(tmp_path / "shards" / "fineweb_train_000000.bin", toks[:4000])
    write_shard(tmp_path / "shards" / "fineweb_val_000000.bin", toks[4000:])
    tok_model = root / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(
        '{"model_file": "tokenizer.model", "vocab_size": 1024, "sha256": "%s", "source": "test"}' % file_sha256(tok_model))
    build_byte_tables(load_tokenizer(tok_model, 1024), 1024).save(tmp_path / "tokenizer" / "byte_tables.pgt")
    mcfg = config.from_dict("model", {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2,
                                      "xsa_last_n": 2, "bigram_buckets": 64, "bigram_dim": 16, "ve_dim": 16,
                                      "ve_last_n": 1, "rope_dims": 8, "residual_dtype": "fp32"})
    cfg = config.from_dict("train", {"device": "cpu", "nproc_per_node": 1, "batch_tokens": 1024, "seq_len": 64,
                                     "grad_accum_steps": 2, "iterations": 2, "warmup_steps": 0, "val_tokens": 1024,
                                     "checkpoint_dir": str(tmp_path / "ckpt"), "doc_packing": True})
    paths = T.Paths(shards=tmp_path / "shards", tokenizer=tmp_path / "tokenizer", out_dir=tmp_path / "out",
                    metrics=tmp_path / "train.json", plots=tmp_path / "train.tsv")
    tr = T.Trainer(mcfg, cfg, paths, dist.init("cpu"), T.check_inputs(paths, mcfg, cfg))
    assert tr.doc_backend == "reference"
    start = tr.loader.state_dict()
    x, y, docs = tr._next_batch(cfg.seq_len)
    assert x.shape == y.shape == (1, 512) and docs.n == 512 and docs.max_len == 64
    assert (D.segment_lengths(docs.cu_seqlens) <= 64).all() and docs.cu_seqlens.numel() % D.CU_BUCKET == 0
    tr.loader.load_state_dict(start)
    with torch.no_grad():
        expect = np.mean([float(tr.model(x, y, docs=docs)) for x, y, docs in
                          (tr._next_batch(cfg.seq_len) for _ in range(tr.split.accum))])
    tr.loader.load_state_dict(start)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    loss = float(tr._step(0, 1.0, cfg.seq_len, None, ema=False))  # 2 micro-batches of one 512-token row
    assert loss == pytest.approx(expect, rel=1e-5)
    assert any(not torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
    ev, _ = tr._evaluate_final()  # val_bpb_float of a doc-packed run: scored within documents
    args = (tr.model, tr.inputs.val_tokens, tr.inputs.tables, cfg.seq_len, cfg.val_batch_seqs, "cpu")
    assert ev["val_loss"] == pytest.approx(bpb.eval_nonsliding(*args, doc_backend="reference")["val_loss"], rel=1e-9)
    assert abs(ev["val_loss"] - bpb.eval_nonsliding(*args)["val_loss"]) > 1e-5  # dense windows: another score
