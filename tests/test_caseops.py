"""CaseOps (pgolf.prepare.caseops) and the validation byte sidecar (pgolf.shared.val_bytes):
the transform's exact round trip on real documents and by hand, the oracle (pgolf's prepare vs
PR #2135's own prepare_caseops_data.py, token for token and byte count for byte count), val_bpb
on original bytes against a hand computation, and the errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from conftest import MICRO_CFG, tiny_model
from pgolf import config
from pgolf.prepare import caseops, prepare
from pgolf.prepare.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError
from pgolf.prepare.corpus import iter_documents, read_documents
from pgolf.prepare.tokenizer import build_byte_tables
from pgolf.shared import bpb, shards, tokenizer_meta, val_bytes
from pgolf.shared.byte_tables import ByteTables, load_byte_tables
from pgolf.shared.io import file_sha256
from pgolf.shared.val_bytes import SidecarBytes, SidecarError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CASEOPS_MODEL = REPO / "data" / "tokenizer_src" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
CASEOPS_SHA = "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"
SP1024 = REPO / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"
VAL_DOCS = REPO / "data" / "corpus" / "val" / "fineweb_val_first901.jsonl.zst"  # = shared/data/fineweb_val_first901
PROXY_IN_REPO = REPO / "data" / "corpus" / "train" / "proxy-000-first711.jsonl.zst"  # first 711 docs of docs-000
PROXY_SHARED = SHARED / "data" / "proxy_corpus" / "docs-001.jsonl.zst"

# text that exercises the corners: operator characters in the text, capitals of every kind,
# non-ASCII capitals, whitespace the normalizer drops or collapses, byte-fallback characters
HAND_DOCS = [
    "The NASA iPhone costs $999. OK? I am A-OK; McDonald's ABc aBC x Y.",
    f"literal operators {TITLE}{ALLCAPS}{CAPNEXT}{ESC} and {ESC}{ESC}Word {TITLE}The",
    "  leading and trailing spaces  \n\n\tTabs\tand\r\nCRLF   runs   of   spaces ",
    "ÉCOLE École ÀB Über STRASSE ǅ ﬁne Ⅻ ＡＢＣ",
    "emoji 😀 CJK 中文 MIXED 😀Case",
    "A",
    "",
]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL))


@pytest.fixture(scope="module")
def val_texts():
    return read_documents(VAL_DOCS)


def _jsonl(path: Path, texts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _cfg(**kw):
    base = dict(source="local", corpus="corpus", val_source="val", val_docs=0, tokenizer=str(CASEOPS_MODEL),
                vocab_size=8192, shard_tokens=100_000, workers=1, text_transform="caseops")
    base.update(kw)
    return config.from_dict("prepare", base)


# ----------------------------------------------------------------------------- the transform


@pytest.mark.parametrize("text,encoded", [
    ("the cat", "the cat"),
    ("The Cat", f"{TITLE}the {TITLE}cat"),
    ("NASA", f"{ALLCAPS}nasa"),
    ("A I", f"{TITLE}a {TITLE}i"),  # one capital: TITLE, never ALLCAPS
    ("iPhone", f"i{CAPNEXT}phone"),
    ("McDonald", f"{TITLE}mc{CAPNEXT}donald"),
    ("ABc", f"{TITLE}a{CAPNEXT}bc"),
    ("aBC", f"a{CAPNEXT}b{CAPNEXT}c"),
    ("NASA's USB3 x86-64", f"{ALLCAPS}nasa's {ALLCAPS}usb3 x86-64"),  # digits and punctuation end a word
    ("ÉCOLE", f"É{ALLCAPS}cole"),  # non-ASCII letters are not letters of a word, and stay as they are
    (f"{TITLE}x", f"{ESC}{TITLE}x"),
    (f"a{ESC}B", f"a{ESC}{ESC}{TITLE}b"),
    ("", ""),
])
def test_encode_by_hand(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


@pytest.mark.parametrize("bad,why", [
    (TITLE, "no letter after it"), (f"{TITLE} x", "no letter after it"), (f"x{TITLE}y", "inside a word"),
    (f"{CAPNEXT}a", "not inside a word"), (f"{ALLCAPS}a", "ALLCAPS"), (f"{ALLCAPS}ab{CAPNEXT}c", "ALLCAPS"),
    (f"{ESC}x", "no letter after it"), (ESC, "no letter after it"), ("Abc", "a capital letter"),
])
def test_decode_rejects_what_encode_never_writes(bad, why):
    with pytest.raises(CaseOpsError, match=why):
        caseops.decode(bad)


def test_round_trip_on_the_901_validation_documents(val_texts):
    assert len(val_texts) == 901
    enc = [caseops.encode(t) for t in val_texts]
    assert [caseops.decode(e) for e in enc] == val_texts
    assert sum(e != t for e, t in zip(enc, val_texts)) > 850  # almost every document has capitals
    assert not any(ch.isascii() and ch.isupper() for e in enc for ch in e)


def test_round_trip_on_the_proxy_corpus():
    docs = read_documents(PROXY_IN_REPO)
    if PROXY_SHARED.is_file():
        docs += list(islice(iter_documents(PROXY_SHARED), 300))
    for d in docs + HAND_DOCS:
        assert caseops.decode(caseops.encode(d)) == d


def test_original_bytes_per_character():
    enc = caseops.encode(f"Aé {TITLE}")  # TITLE a é space ESC TITLE
    assert enc == f"{TITLE}aé {ESC}{TITLE}"
    assert caseops.original_bytes(enc).tolist() == [0, 1, 2, 1, 0, 3]
    for d in HAND_DOCS:
        assert int(caseops.original_bytes(caseops.encode(d)).sum()) == len(d.encode("utf-8"))
    with pytest.raises(CaseOpsError, match="ESC at character 1 escapes no operator"):
        caseops.original_bytes(f"a{ESC}b")


def test_piece_spans_credit_every_byte_once(sp, val_texts):
    """SentencePiece's spans of the transformed text credit each val document's original bytes in
    full (it is normalized text: nothing is dropped), operator pieces 0."""
    for text in val_texts[:200] + HAND_DOCS[:2]:
        enc = caseops.encode(text)
        m = sp.encode(enc, out_type="offset_mapping")
        counts = caseops.piece_original_bytes(enc, m["offsets"])
        assert int(counts.sum()) == len(text.encode("utf-8"))
        ops = np.isin(m["ids"], [sp.piece_to_id(op) for op in caseops.OPERATORS])
        assert not counts[ops].any() or ESC in text  # an escaped operator is text: its piece counts 3


def test_the_caseops_model(sp):
    assert CASEOPS_MODEL.stat().st_size == 366_510 and file_sha256(CASEOPS_MODEL) == CASEOPS_SHA
    assert sp.vocab_size() == 8192 and (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (1, 2, 0, 3)
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS)
    caseops.check_tokenizer(sp, "x.model")
    with pytest.raises(CaseOpsError, match=r"x\.model: prepare\.text_transform is caseops but the tokenizer lacks"):
        caseops.check_tokenizer(spm.SentencePieceProcessor(model_file=str(SP1024)), "x.model")


# ----------------------------------------------------------------------------- the oracle: PR #2135's own script


def _oracle_docs(val_texts):
    proxy = read_documents(PROXY_IN_REPO, limit=90)
    return val_texts[:50] + proxy[:30] + HAND_DOCS, proxy[30:90]


def test_prepare_matches_the_anchor_token_for_token(tmp_path, monkeypatch, val_texts):
    """pgolf's prepare vs PR #2135's prepare_caseops_data.py on the same documents: the same val
    tokens, the same byte sidecar, the same train tokens, byte-identical shard files. Validation here
    is 50 val docs + 30 proxy docs (raw text: newlines, runs of spaces) + the hand documents.

    The anchor calls sentencepiece's encode_as_immutable_proto, which our sentencepiece (0.2.3)
    no longer has: tests/anchor_stubs/sp_immutable_proto.py stands in for it (the same proto,
    parsed from encode(out_type="serialized_proto")); bench/caseops_oracle.py checked it against a
    real sentencepiece 0.2.1 (bench/results/caseops_oracle.json)."""
    from bench import caseops_oracle as oracle

    if not oracle.ANCHOR_SCRIPT.is_file():
        pytest.skip(f"{oracle.ANCHOR_SCRIPT} is absent (the anchors live in ../shared)")
    shim = oracle.shim()
    monkeypatch.setattr(spm.SentencePieceProcessor, "encode_as_immutable_proto", shim.encode_as_immutable_proto,
                        raising=False)
    val, train = _oracle_docs(val_texts)
    module = oracle.load_anchor()
    monkeypatch.setattr(module, "SHARD_TOKENS", 20_000)  # several shards of each kind, cut at the same tokens
    monkeypatch.setattr(oracle, "SHARD_TOKENS", 20_000)
    theirs = oracle.run_anchor(module, oracle.write_jsonl(tmp_path / "docs.jsonl", val + train), tmp_path / "anchor",
                               len(val))
    ours = oracle.run_pgolf(tmp_path / "pgolf", oracle.write_jsonl(tmp_path / "val.jsonl", val),
                            oracle.write_jsonl(tmp_path / "train.jsonl", train))
    res = oracle.compare(ours, theirs)
    for key in ("val_tokens", "val_bytes", "train_tokens"):
        assert res[key]["mismatches"] == 0 and res[key]["pgolf"] == res[key]["anchor"] > 40_000, (key, res[key])
    assert len(res["files_identical"]) >= 6 and all(res["files_identical"].values()), res["files_identical"]
    side = val_bytes.read_sidecar(ours)
    assert int(side.sum()) < sum(len(t.encode()) for t in val)  # the raw proxy text's dropped whitespace
    metrics = json.loads((tmp_path / "pgolf" / "metrics" / "prepare.json").read_text())
    assert metrics["val_bytes"] == int(side.sum()) and metrics["byte_source"] == "sidecar"


def test_shim_surfaces_are_the_offset_spans(sp, val_texts):
    """The stand-in's piece.surface (what the anchor counts) is the span pgolf counts, text[begin:end]."""
    from bench import caseops_oracle as oracle

    shim = oracle.shim()
    for text in val_texts[:40] + HAND_DOCS + read_documents(PROXY_IN_REPO, limit=20):
        enc = caseops.encode(text)
        proto = shim.encode_as_immutable_proto(sp, enc)
        m = sp.encode(enc, out_type="offset_mapping")
        assert [p.id for p in proto.pieces] == m["ids"] == sp.encode(enc)
        assert [p.surface for p in proto.pieces] == [enc[b:e] for b, e in m["offsets"]]
        assert proto.text == enc  # the input, as in 0.2.1


# ----------------------------------------------------------------------------- prepare


def test_prepare_caseops_writes_the_sidecar_and_original_bytes(tmp_path, sp, val_texts):
    _jsonl(tmp_path / "val" / "v.jsonl", val_texts[:40])
    _jsonl(tmp_path / "corpus" / "t.jsonl", read_documents(PROXY_IN_REPO, limit=20))
    m = prepare.run(_cfg(shard_tokens=5000), tmp_path)
    sdir, tdir = tmp_path / "data" / "shards", tmp_path / "data" / "tokenizer"
    vals, side = shards.list_shards(sdir, "val"), val_bytes.list_sidecar(sdir)
    assert [p.name for p in side] == [val_bytes.sidecar_name(i) for i in range(len(vals))] and len(vals) > 1
    tokens, counts = shards.load_tokens(vals), val_bytes.read_sidecar(sdir)
    assert counts.size == tokens.size and not counts[tokens == shards.BOS_ID].any()
    docs = np.split(tokens, np.flatnonzero(tokens == shards.BOS_ID)[1:])
    assert [caseops.decode(sp.decode(d[1:].tolist())) for d in docs] == val_texts[:40]  # normalized val text
    original = sum(len(t.encode()) for t in val_texts[:40])
    assert m["val_bytes"] == int(counts.sum()) == original < m["val_bytes_transformed"]
    assert (m["text_transform"], m["byte_source"], m["vocab_size"]) == ("caseops", "sidecar", 8192)
    meta = tokenizer_meta.read_tokenizer_meta(tdir)
    assert tokenizer_meta.text_transform(meta) == "caseops" and meta["sha256"] == CASEOPS_SHA
    counter = val_bytes.byte_counter(sdir, load_byte_tables(tdir), tokens, "caseops")
    assert isinstance(counter, SidecarBytes) and val_bytes.byte_source(counter) == "sidecar"


def test_prepare_none_is_unchanged_and_writes_no_sidecar(tmp_path, val_texts):
    _jsonl(tmp_path / "val" / "v.jsonl", val_texts[:20])
    _jsonl(tmp_path / "corpus" / "t.jsonl", read_documents(PROXY_IN_REPO, limit=5))
    m = prepare.run(_cfg(text_transform="none", tokenizer=str(SP1024), vocab_size=1024), tmp_path)
    sdir = tmp_path / "data" / "shards"
    assert val_bytes.list_sidecar(sdir) == [] and m["byte_source"] == "tables" and "val_bytes_transformed" not in m
    assert "text_transform" not in json.loads((tmp_path / "data" / "tokenizer" / "tokenizer.json").read_text())
    tables = load_byte_tables(tmp_path / "data" / "tokenizer")
    tokens = shards.load_tokens(shards.list_shards(sdir, "val"))
    assert val_bytes.byte_counter(sdir, tables, tokens) is tables
    assert int(val_bytes.table_token_bytes(tokens, tables).sum()) == m["val_bytes"] == tables.stream_bytes(tokens)


def test_prepare_caseops_trains_a_tokenizer_with_the_operators(tmp_path, val_texts):
    _jsonl(tmp_path / "val" / "v.jsonl", val_texts[:3])
    _jsonl(tmp_path / "corpus" / "t.jsonl", [t[:3000] for t in read_documents(PROXY_IN_REPO, limit=6)])
    m = prepare.run(_cfg(tokenizer="train", vocab_size=400), tmp_path)
    sp2 = spm.SentencePieceProcessor(model_file=str(tmp_path / "data" / "tokenizer" / "tokenizer.model"))
    assert [sp2.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", *caseops.OPERATORS]
    assert m["val_bytes"] == sum(len(t.encode()) for t in val_texts[:3]) and m["byte_source"] == "sidecar"


def test_caseops_with_a_tokenizer_lacking_the_operators_names_param_and_file(tmp_path, val_texts):
    _jsonl(tmp_path / "val" / "v.jsonl", val_texts[:3])
    _jsonl(tmp_path / "corpus" / "t.jsonl", val_texts[3:6])
    with pytest.raises(CaseOpsError, match=r"fineweb_1024_bpe\.model: prepare\.text_transform is caseops but the "
                                           r"tokenizer lacks the CaseOps operator piece\(s\) U\+E001, U\+E002"):
        prepare.run(_cfg(tokenizer=str(SP1024), vocab_size=1024), tmp_path)


def test_fineweb_source_links_the_sidecar_and_requires_it_for_caseops(tmp_path, val_texts):
    """A pre-tokenized CaseOps folder (e.g. prepare_caseops_data.py's output) used as source fineweb."""
    _jsonl(tmp_path / "val" / "v.jsonl", val_texts[:10])
    _jsonl(tmp_path / "corpus" / "t.jsonl", read_documents(PROXY_IN_REPO, limit=4))
    first = prepare.run(_cfg(), tmp_path)
    export = tmp_path / "export"
    (tmp_path / "data" / "shards").rename(export)
    m = prepare.run(_cfg(source="fineweb", corpus="export", val_source="export"), tmp_path)
    assert m["val_bytes"] == first["val_bytes"] and m["byte_source"] == "sidecar"
    assert [p.name for p in val_bytes.list_sidecar(tmp_path / "data" / "shards")] == ["fineweb_val_bytes_000000.bin"]
    for p in val_bytes.list_sidecar(export):
        p.unlink()
    with pytest.raises(SidecarError, match=r"export: prepare\.text_transform is caseops but the folder has no byte sidecar"):
        prepare.run(_cfg(source="fineweb", corpus="export", val_source="export"), tmp_path)


# ----------------------------------------------------------------------------- the sidecar and val_bpb


def _tables(V=64):
    base = torch.full((V,), 3)
    base[:2] = 0
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[:2] = True
    return ByteTables(base, torch.zeros(V, dtype=torch.bool), boundary)


def test_val_bpb_on_original_bytes_matches_a_hand_computation(tmp_path):
    """9 targets; the sidecar credits bytes by position (0 to the operator-like token 5 and the BOS)."""
    model = tiny_model(4)
    tokens = np.array([1, 7, 5, 9, 12, 1, 5, 30, 31, 2], dtype=np.uint16)
    counts = np.array([0, 4, 0, 2, 1, 0, 0, 7, 3, 1])
    shards.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    val_bytes.write_sidecar(tmp_path / "fineweb_val_bytes_000000.bin", counts)
    assert [p.name for p in shards.list_shards(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    counter = val_bytes.byte_counter(tmp_path, _tables(), bpb.load_val_tokens(tmp_path), "caseops")
    with torch.no_grad():
        logits = model.forward_logits(torch.from_numpy(tokens[:-1].astype(np.int64))[None])[0]  # (9, V)
    nll = float(F.cross_entropy(logits.double(), torch.from_numpy(tokens[1:].astype(np.int64)), reduction="sum"))
    want = nll / (math.log(2) * counts[1:].sum())  # 18 original bytes
    flat = bpb.eval_nonsliding(model, tokens, counter, seq_len=9, batch_seqs=1, device="cpu")
    slide = bpb.eval_sliding(model, tokens, counter, context=4, stride=2, batch_seqs=3, device="cpu")
    assert flat["bytes"] == slide["scored_bytes"] == 18
    assert flat["val_bpb"] == pytest.approx(want, rel=1e-6)
    tables_bpb = bpb.eval_nonsliding(model, tokens, _tables(), seq_len=9, batch_seqs=1, device="cpu")["val_bpb"]
    assert tables_bpb == pytest.approx(want * 18 / 24, rel=1e-6)  # the tables: 3 bytes a token, 0 for BOS


def test_a_sidecar_of_the_tables_counts_gives_the_same_val_bpb_to_the_last_digit(tmp_path, val_texts):
    """The `none` equivalence: a sidecar holding the tables' per-token counts scores bit for bit as
    the tables (the byte-count path the tiny profile's eval.json was reproduced with)."""
    sp1024 = spm.SentencePieceProcessor(model_file=str(SP1024))
    ids = [1]
    for t in val_texts[:4]:
        ids += [1] + sp1024.encode(t)
    tokens = np.array(ids[1:], dtype=np.uint16)[:600]
    tables = build_byte_tables(sp1024, 1024)
    shards.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    val_bytes.write_sidecar(tmp_path / "fineweb_val_bytes_000000.bin", val_bytes.table_token_bytes(tokens, tables))
    counter = val_bytes.byte_counter(tmp_path, tables, tokens)
    model = tiny_model(5, cfg=dataclasses.replace(MICRO_CFG, vocab_size=1024))
    a = bpb.eval_sliding(model, tokens, tables, 64, 16, 4, "cpu")
    b = bpb.eval_sliding(model, tokens, counter, 64, 16, 4, "cpu")
    assert a == b and a["scored_bytes"] == tables.stream_bytes(tokens)


def test_sidecar_errors_name_the_file(tmp_path):
    tokens = np.array([1, 7, 5, 9, 1, 5], dtype=np.uint16)
    shards.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    with pytest.raises(SidecarError, match=r"no byte sidecar fineweb_val_bytes_\*\.bin, but the data was prepared "
                                           r"with text_transform caseops"):
        val_bytes.byte_counter(tmp_path, _tables(), tokens, "caseops")
    val_bytes.write_sidecar(tmp_path / "fineweb_val_bytes_000000.bin", [0, 1, 1, 1, 0])
    with pytest.raises(SidecarError, match=r"fineweb_val_bytes_000000\.bin: byte sidecar has 5 entries but "
                                           r"fineweb_val_000000\.bin has 6 tokens"):
        val_bytes.byte_counter(tmp_path, _tables(), tokens)
    val_bytes.write_sidecar(tmp_path / "fineweb_val_bytes_000000.bin", [0, 1, 1, 1, 2, 1])
    with pytest.raises(SidecarError, match="credits 2 bytes to the BOS at validation token 4"):
        val_bytes.byte_counter(tmp_path, _tables(), tokens)
    val_bytes.write_sidecar(tmp_path / "fineweb_val_bytes_000001.bin", [0])
    with pytest.raises(SidecarError, match=r"2 byte sidecar file\(s\) fineweb_val_bytes_\*\.bin for 1 validation shard"):
        val_bytes.read_sidecar(tmp_path)
    (tmp_path / "fineweb_val_bytes_000001.bin").write_bytes(b"\0" * 10)
    shards.write_shard(tmp_path / "fineweb_val_000001.bin", [1])
    with pytest.raises(SidecarError, match=r"fineweb_val_bytes_000001\.bin: truncated header"):
        val_bytes.read_sidecar(tmp_path)
    with pytest.raises(SidecarError, match="more than a uint16 entry holds"):
        val_bytes.write_sidecar(tmp_path / "x.bin", [0, 70_000])
    with pytest.raises(ValueError, match="counts by stream position"):
        SidecarBytes(torch.zeros(3), _tables()).count(torch.zeros(1), torch.zeros(1))


def test_evaluate_without_the_sidecar_of_caseops_data_is_an_error(tmp_path):
    """evaluate and train turn a missing sidecar of CaseOps data into their own error naming the folder."""
    from pgolf.train.inputs import Paths, TrainError, check_inputs

    sdir, tdir = tmp_path / "shards", tmp_path / "tok"
    tokens = np.array([1, 7, 5, 9, 1, 5] * 200, dtype=np.uint16)
    shards.write_shard(sdir / "fineweb_val_000000.bin", tokens)
    shards.write_shard(sdir / "fineweb_train_000000.bin", tokens)
    _tables().save(tdir / "byte_tables.pgt")
    tokenizer_meta.write_tokenizer_meta(tdir, {"model_file": "tokenizer.model", "vocab_size": 64, "sha256": "ab",
                                               "text_transform": "caseops"})
    mcfg = config.from_dict("model", {"vocab_size": 64})
    cfg = config.from_dict("train", {"val_tokens": 0})
    with pytest.raises(TrainError, match=r"shards: no byte sidecar .* text_transform caseops"):
        check_inputs(Paths(shards=sdir, tokenizer=tdir), mcfg, cfg)
    val_bytes.write_sidecar(sdir / "fineweb_val_bytes_000000.bin", np.where(tokens == 1, 0, 2))
    inputs = check_inputs(Paths(shards=sdir, tokenizer=tdir), mcfg, cfg)
    assert isinstance(inputs.tables, SidecarBytes) and inputs.tables.vocab_size == 64


def test_evaluate_and_ttt_score_the_sidecar_bytes(tmp_path):
    """evaluate (sliding, non-sliding, score-first TTT) and the summary on a folder with a sidecar:
    every byte sum is the sidecar's over the scored targets, val_bpb as bpb computes it with it."""
    from test_evaluate import make_workdir, paths, tables as wd_tables, val_tokens

    from pgolf.evaluate import ttt
    from pgolf.evaluate.evaluate import load_model, run
    from pgolf.submit.summary import render

    root = make_workdir(tmp_path, tiny_model(8), lossless=True)
    sdir = root / "data/shards"
    rng = np.random.default_rng(1)
    for i, p in enumerate(shards.list_shards(sdir, "val")):
        t = shards.read_shard(p)
        val_bytes.write_sidecar(sdir / val_bytes.sidecar_name(i), np.where(t == 1, 0, rng.integers(0, 7, t.size)))
    cfg = config.EvaluateConfig(context=16, stride=4, batch_seqs=4, max_tokens=200, device="cpu", compile=False,
                                ttt_enabled=True, ttt_chunk_tokens=48, ttt_lr=0.05, ttt_rank=2, ttt_epochs=1,
                                ttt_batch_seqs=2)
    m = run(cfg, paths(root), progress=False)
    toks = val_tokens(root)
    counter = val_bytes.byte_counter(sdir, wd_tables(), toks)
    want_bytes = int(val_bytes.read_sidecar(sdir)[1:toks.size].sum())
    plain = bpb.eval_sliding(tiny_model(8), toks, counter, 16, 4, 4, "cpu")
    model, _ = load_model(root / "artifacts/final/model.ptz")
    ref = ttt.eval_ttt(model, toks, counter, cfg, "cpu")
    assert m["scored_bytes"] == plain["scored_bytes"] == ref.scored_bytes == want_bytes
    assert want_bytes != wd_tables().stream_bytes(toks)
    assert m["val_bpb_pre_ttt"] == pytest.approx(plain["val_bpb"], abs=1e-12)
    assert m["val_bpb"] == pytest.approx(ref.val_bpb, abs=1e-12) and m["byte_source"] == "sidecar"
    assert "original bytes, byte sidecar" in render(root / "metrics")


def test_proxy_shards_builds_a_caseops_folder_prepare_reads(tmp_path, val_texts):
    """bench.proxy_shards --text-transform caseops: train shards, val shards and the sidecar in one
    folder, which `prepare.source: fineweb` takes as it is."""
    from bench import proxy_shards

    _jsonl(tmp_path / "val.jsonl", val_texts[:12])
    _jsonl(tmp_path / "proxy.jsonl", read_documents(PROXY_IN_REPO, limit=8))
    info = proxy_shards.build(tmp_path / "proxy.jsonl", None, tmp_path / "out", 1, val_docs=tmp_path / "val.jsonl",
                              tokenizer=CASEOPS_MODEL, text_transform="caseops", shard_tokens=8000)
    assert info["val_byte_sidecar"] == [val_bytes.sidecar_name(i) for i in range(len(info["val_shards"]))]
    assert len(info["val_shards"]) > 1 and info["train_shards"] > 1
    assert info["val_bytes"] == sum(len(t.encode()) for t in val_texts[:12])
    m = prepare.run(_cfg(source="fineweb", corpus="out", val_source="out"), tmp_path)
    assert (m["val_bytes"], m["val_tokens"], m["train_tokens"]) == (info["val_bytes"], info["val_tokens"],
                                                                   info["train_tokens"])
    with pytest.raises(SystemExit, match="needs --val-docs"):
        proxy_shards.build(tmp_path / "proxy.jsonl", tmp_path / "out", tmp_path / "o2", 1, text_transform="caseops",
                           tokenizer=CASEOPS_MODEL)
