"""Tests for the prepare stage: corpus reading, tokenizer checks, byte check, shards, fineweb export."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from conftest import write_params
from pgolf import config
from pgolf.shared import byte_tables, shards, tokenizer_meta
from pgolf.prepare import fineweb, prepare, tokenizer
from pgolf.config import ConfigError, PrepareConfig
from pgolf.prepare.corpus import CorpusError, corpus_files, read_documents
from pgolf.prepare.tokenizer import TokenizerError

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_MODEL = REPO / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"
VAL_DOCS = REPO / "data" / "corpus" / "val" / "fineweb_val_first901.jsonl.zst"  # normalized text, val docs 0-900
TRAIN_CORPUS = REPO / "data" / "corpus" / "train" / "proxy-000-first711.jsonl.zst"
FIXTURE = Path(__file__).parent / "fixtures" / "fineweb_val_prefix20k.bin"
OFFICIAL_SHA = "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a"


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(OFFICIAL_MODEL))


@pytest.fixture(scope="module")
def val_texts():
    return read_documents(VAL_DOCS, limit=50)


@pytest.fixture(scope="module")
def train_texts():
    return read_documents(TRAIN_CORPUS, limit=6)


def _jsonl(path: Path, texts, zst=False) -> Path:
    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if zst else raw)
    return path


def _cfg(**kw) -> PrepareConfig:
    base = dict(source="local", corpus="corpus", val_source="val", val_docs=0, tokenizer=str(OFFICIAL_MODEL),
                vocab_size=1024, shard_tokens=100_000, workers=1)
    base.update(kw)
    return config.from_dict("prepare", base)


# ----------------------------------------------------------------------------- corpus


def test_corpus_folder_sorted_recursive_formats(tmp_path):
    _jsonl(tmp_path / "b" / "2.jsonl.zst", ["zst one", "zst two"], zst=True)
    _jsonl(tmp_path / "a.jsonl", ["first", "", "second"])
    (tmp_path / "b" / "1.txt").write_text("a whole\nfile\n")
    (tmp_path / "licenses").mkdir()
    (tmp_path / "licenses" / "GPL.txt").write_text("licence text, not a document")
    (tmp_path / "b" / "licenses").mkdir()
    _jsonl(tmp_path / "b" / "licenses" / "x.jsonl", ["nope"])
    (tmp_path / "notes.md").write_text("ignored")
    assert [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)] == ["a.jsonl", "b/1.txt", "b/2.jsonl.zst"]
    assert read_documents(tmp_path) == ["first", "", "second", "a whole\nfile\n", "zst one", "zst two"]
    assert read_documents(tmp_path, limit=2) == ["first", ""]


def test_corpus_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl: line 2: not valid UTF-8"):
        read_documents(p)
    q = tmp_path / "bad.txt"
    q.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(CorpusError, match=r"bad\.txt: line 2: not valid UTF-8"):
        read_documents(q)
    z = tmp_path / "bad.jsonl.zst"
    z.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "\xc3("}\n'))
    with pytest.raises(CorpusError, match=r"bad\.jsonl\.zst: line 1: not valid UTF-8"):
        read_documents(z)


def test_corpus_missing_text_field_and_bad_json(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(CorpusError, match=r'c\.jsonl: line 2: no "text" field'):
        read_documents(p)
    p.write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(CorpusError, match=r'c\.jsonl: line 2: "text" is int'):
        read_documents(p)
    p.write_text('{"text": "a"\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl: line 1: not valid JSON"):
        read_documents(p)


def test_corpus_missing_and_empty(tmp_path):
    with pytest.raises(CorpusError, match="nowhere: corpus path not found"):
        read_documents(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty corpus"):
        read_documents(tmp_path / "empty")
    (tmp_path / "empty" / "x.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match="empty corpus"):
        read_documents(tmp_path / "empty")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocab_mismatch_names_file_and_numbers():
    with pytest.raises(TokenizerError, match=r"fineweb_1024_bpe\.model: tokenizer vocab_size 1024 != prepare\.vocab_size 512"):
        tokenizer.load_tokenizer(OFFICIAL_MODEL, 512)
    assert tokenizer.load_tokenizer(OFFICIAL_MODEL, 1024).vocab_size() == 1024


def test_tokenizer_vocab_over_uint16():
    with pytest.raises(TokenizerError, match=r"fake\.model: vocab_size 70000 > 65536"):
        tokenizer.check_vocab_size(70000, 70000, "fake.model")
    tokenizer.check_vocab_size(65536, 65536, "ok.model")  # the largest that fits


def test_tokenizer_missing_or_not_a_model(tmp_path):
    with pytest.raises(TokenizerError, match="none.model: tokenizer model not found"):
        tokenizer.load_tokenizer(tmp_path / "none.model", 1024)
    (tmp_path / "t.vocab").write_text("x")
    with pytest.raises(TokenizerError, match="not a SentencePiece .model"):
        tokenizer.load_tokenizer(tmp_path / "t.vocab", 1024)
    (tmp_path / "junk.model").write_bytes(b"not a protobuf at all")
    with pytest.raises(TokenizerError, match="junk.model: cannot load"):
        tokenizer.load_tokenizer(tmp_path / "junk.model", 1024)


def test_official_sha256():
    assert tokenizer.file_sha256(OFFICIAL_MODEL) == OFFICIAL_SHA


def test_training_sentences_rule():
    assert list(tokenizer.training_sentences(["  a\x00b  ", "\x00 \n", "c"])) == ["a b", "c"]


# ----------------------------------------------------------------------------- byte check


def test_val_text_tokens_match_official_stream(sp, val_texts):
    fixture = shards.read_shard(FIXTURE)
    bos = np.nonzero(fixture == 1)[0]  # 13 documents start in the fixture; the first 12 are complete
    ours = np.concatenate([np.concatenate([[1], ids]) for ids in sp.encode(val_texts[:12])])
    assert ours.tolist() == fixture[:bos[12]].tolist()


def test_byte_check_on_val_docs(sp, val_texts):
    tables = tokenizer.build_byte_tables(sp, 1024)
    ids = [np.asarray(d) for d in sp.encode(val_texts)]
    text_bytes = [tokenizer.decoded_bytes(sp, d) for d in ids]
    tab, txt = tokenizer.byte_check(ids, text_bytes, tables)
    # the committed val text is already normalized, so it IS the decoded text
    assert tab == txt == sum(len(t.encode("utf-8")) for t in val_texts)
    assert tab == int(tokenizer.table_bytes_per_doc(ids, tables).sum())
    # the same count over the BOS-led token stream (what the shards hold)
    stream = np.concatenate([np.concatenate([[1], d]) for d in ids])
    assert tables.stream_bytes(stream) == tab


def test_byte_check_catches_wrong_tables(sp, val_texts):
    tables = tokenizer.build_byte_tables(sp, 1024)
    ids = [np.asarray(d) for d in sp.encode(val_texts[:5])]
    text_bytes = [tokenizer.decoded_bytes(sp, d) for d in ids]
    broken = byte_tables.ByteTables(tables.base_bytes.clone(), tables.has_leading_space.clone(), tables.is_boundary)
    broken.has_leading_space[sp.piece_to_id("\u2581the")] = False
    with pytest.raises(TokenizerError, match="byte check failed on validation document"):
        tokenizer.byte_check(ids, text_bytes, broken)


# ----------------------------------------------------------------------------- config


def test_prepare_param_of_wrong_type():
    with pytest.raises(ConfigError, match=r"prepare\.vocab_size must be int, got str"):
        config.from_dict("prepare", {"vocab_size": "1024"})
    with pytest.raises(ConfigError, match=r"prepare\.workers must be int"):
        config.from_dict("prepare", {"workers": 2.5})


@pytest.mark.parametrize("key,value,msg", [("source", "web", "prepare.source must be one of"),
                                           ("workers", 0, "prepare.workers must be >= 1"),
                                           ("vocab_size", 70000, "prepare.vocab_size must be in"),
                                           ("shard_tokens", 0, "prepare.shard_tokens must be in")])
def test_prepare_param_out_of_range(tmp_path, key, value, msg):
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        prepare.run(_cfg(**{key: value}), tmp_path)


def test_no_validation_configured(tmp_path):
    with pytest.raises(ConfigError, match=r"prepare\.val_docs must be > 0 when prepare\.val_source is prepare\.corpus"):
        prepare.run(_cfg(val_source="corpus", val_docs=0), tmp_path)
    # an empty path would be an empty DVC dependency of prepare, which stops `dvc repro` with no reason given
    with pytest.raises(ConfigError, match=r"prepare\.val_source must name the validation documents .* or be "
                                          r"prepare\.corpus itself"):
        prepare.run(_cfg(val_source="", val_docs=10), tmp_path)


# ----------------------------------------------------------------------------- prepare end to end


def _setup_text(tmp_path, train_texts, val_texts, n_val=5):
    _jsonl(tmp_path / "corpus" / "part.jsonl.zst", train_texts, zst=True)
    _jsonl(tmp_path / "val" / "val.jsonl", val_texts[:n_val])


def _expected_stream(sp, texts):
    return np.concatenate([np.concatenate([[1], ids]) for ids in sp.encode(texts)]).astype(np.uint16)


def test_prepare_official_tokenizer(tmp_path, sp, train_texts, val_texts):
    _setup_text(tmp_path, train_texts, val_texts)
    m = prepare.run(_cfg(shard_tokens=4000), tmp_path)
    shard_dir = tmp_path / "data" / "shards"
    train, val = shards.list_shards(shard_dir, "train"), shards.list_shards(shard_dir, "val")
    exp_train, exp_val = _expected_stream(sp, train_texts), _expected_stream(sp, val_texts[:5])
    assert shards.load_tokens(train).tolist() == exp_train.tolist()
    assert shards.load_tokens(val).tolist() == exp_val.tolist()
    assert len(train) == -(-exp_train.size // 4000) and all(shards.read_shard(p).size == 4000 for p in train[:-1])
    val_bytes = sum(len(t.encode()) for t in val_texts[:5])
    assert {k: m[k] for k in ("vocab_size", "train_tokens", "val_tokens", "val_bytes", "train_docs", "val_docs")} == {
        "vocab_size": 1024, "train_tokens": exp_train.size, "val_tokens": exp_val.size, "val_bytes": val_bytes,
        "train_docs": 6, "val_docs": 5}
    assert m["tokenizer_sha256"] == OFFICIAL_SHA and m["byte_check"] == "passed"
    assert json.loads((tmp_path / "metrics" / "prepare.json").read_text())["val_bytes"] == val_bytes
    tok = tmp_path / "data" / "tokenizer"
    assert (tok / "tokenizer.model").read_bytes() == OFFICIAL_MODEL.read_bytes()
    meta = tokenizer_meta.read_tokenizer_meta(tok)
    assert meta == {"model_file": "tokenizer.model", "vocab_size": 1024, "sha256": OFFICIAL_SHA,
                    "source": str(OFFICIAL_MODEL)}
    tables = byte_tables.load_byte_tables(tok)
    assert tables.meta == {"tokenizer_sha256": OFFICIAL_SHA, "vocab_size": 1024} and tables.vocab_size == 1024


def test_prepare_val_docs_from_corpus_with_worker_pool(tmp_path, sp, train_texts):
    paragraphs = [p for t in train_texts for p in t.split("\n") if p.strip()]
    docs = (paragraphs * (600 // len(paragraphs) + 1))[:600]  # > 2 chunks of 256 docs: the pool path
    _jsonl(tmp_path / "corpus" / "docs.jsonl", docs)
    m = prepare.run(_cfg(val_source="./corpus/", val_docs=300, max_train_docs=250, workers=2), tmp_path)  # = corpus
    shard_dir = tmp_path / "data" / "shards"
    assert shards.load_tokens(shards.list_shards(shard_dir, "val")).tolist() == _expected_stream(sp, docs[:300]).tolist()
    assert shards.load_tokens(shards.list_shards(shard_dir, "train")).tolist() == _expected_stream(sp, docs[300:550]).tolist()
    assert (m["val_docs"], m["train_docs"]) == (300, 250)


def test_prepare_trains_a_tokenizer(tmp_path, train_texts, val_texts):
    _setup_text(tmp_path, [t[:3000] for t in train_texts], val_texts, n_val=3)
    m = prepare.run(_cfg(tokenizer="train", vocab_size=384), tmp_path)
    tok = tmp_path / "data" / "tokenizer"
    sp2 = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    assert sp2.vocab_size() == 384 == m["vocab_size"]
    assert [sp2.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sp2.id_to_piece(4) == "<0x00>" and sp2.id_to_piece(259) == "<0xFF>"
    assert tokenizer_meta.read_tokenizer_meta(tok)["source"].startswith("trained")
    assert m["byte_check"] == "passed" and m["val_bytes"] == sum(len(t.encode()) for t in val_texts[:3])
    val = shards.load_tokens(shards.list_shards(tmp_path / "data" / "shards", "val"))
    docs = np.split(val, np.nonzero(val == 1)[0][1:])
    assert [sp2.decode(d[1:].tolist()) for d in docs] == val_texts[:3]  # val text is already normalized


def test_prepare_missing_sources(tmp_path):
    with pytest.raises(CorpusError, match="corpus: corpus path not found"):
        prepare.run(_cfg(), tmp_path)
    _jsonl(tmp_path / "corpus" / "a.jsonl", ["text"])
    with pytest.raises(CorpusError, match="val: corpus path not found"):
        prepare.run(_cfg(), tmp_path)
    _jsonl(tmp_path / "val" / "a.jsonl", ["text"])
    with pytest.raises(TokenizerError, match="missing.model: tokenizer model not found"):
        prepare.run(_cfg(tokenizer=str(tmp_path / "missing.model")), tmp_path)


def test_failed_prepare_leaves_previous_outputs(tmp_path, train_texts, val_texts):
    _setup_text(tmp_path, train_texts, val_texts)
    prepare.run(_cfg(), tmp_path)
    out = tmp_path / "data"

    def snapshot():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    assert "shards/fineweb_train_000000.bin" in before and "tokenizer/byte_tables.pgt" in before
    # a later training file with invalid UTF-8: fails after val shards and some train shards were written
    (tmp_path / "corpus" / "zz_bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(CorpusError, match=r"zz_bad\.jsonl: line 2: not valid UTF-8"):
        prepare.run(_cfg(shard_tokens=1000), tmp_path)
    assert snapshot() == before
    assert sorted(p.name for p in out.iterdir()) == ["shards", "tokenizer"]  # no temp folders left


# ----------------------------------------------------------------------------- challenge export


def _fake_repo(tmp_path, n_train=3, manifest=True):
    """A fake Hugging Face repo: remote path -> local file, with the export's layout."""
    files = {}
    store = tmp_path / "hf"
    store.mkdir()
    fixture = shards.read_shard(FIXTURE)
    for i in range(n_train):
        p = store / f"train{i}.bin"
        shards.write_shard(p, fixture[i * 100:(i + 1) * 100 + 5000])
        files[fineweb.shard_remote("train", i)] = p
    files[fineweb.shard_remote("val", 0)] = FIXTURE
    files[f"datasets/tokenizers/{fineweb.TOKENIZER_FILE}"] = OFFICIAL_MODEL
    if manifest:
        m = store / "manifest.json"
        m.write_text(json.dumps({"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                                               "stats": {"files_train": n_train, "files_val": 1}}],
                                 "tokenizers": [{"name": "sp_bpe_1024",
                                                 "model_path": f"tokenizers/{fineweb.TOKENIZER_FILE}"}]}))
        files["datasets/manifest.json"] = m
    calls = []

    def downloader(repo, remote):
        calls.append((repo, remote))
        if remote not in files:
            raise FileNotFoundError(remote)
        return files[remote]

    def lister(repo):
        return sorted(files) + ["datasets/docs_selected.jsonl", "README.md"]

    return downloader, lister, calls


def test_fineweb_remote_paths():
    plan = fineweb.plan(2, None, ["datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                                  "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                                  "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                                  "datasets/datasets/fineweb10B_sp512/fineweb_train_000002.bin"])
    assert plan == ["datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                    "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                    "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                    "datasets/tokenizers/fineweb_1024_bpe.model"]
    with pytest.raises(fineweb.DownloadError, match="has 2 training shards, --train-shards asked for 3"):
        fineweb.plan(3, None, plan)


@pytest.mark.parametrize("with_manifest", [True, False])
def test_fineweb_download_with_fake_hub(tmp_path, with_manifest):
    downloader, lister, calls = _fake_repo(tmp_path, manifest=with_manifest)
    out = tmp_path / "export"
    paths = fineweb.download(2, out, "some/repo", downloader=downloader, lister=lister)
    assert [p.name for p in paths] == ["fineweb_val_000000.bin", "fineweb_train_000000.bin",
                                       "fineweb_train_000001.bin", "fineweb_1024_bpe.model"]
    assert (out / "fineweb_val_000000.bin").read_bytes() == FIXTURE.read_bytes()
    assert all(repo == "some/repo" for repo, _ in calls) and calls[0][1] == "datasets/manifest.json"
    n = len(calls)
    fineweb.download(2, out, "some/repo", downloader=downloader, lister=lister)  # all present: nothing fetched
    assert [c for _, c in calls[n:]] == ["datasets/manifest.json"]
    with pytest.raises(fineweb.DownloadError, match="has 3 training shards"):
        fineweb.download(4, out, "some/repo", downloader=downloader, lister=lister)


def test_fineweb_download_needs_huggingface_hub(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *a, **k):
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(fineweb.DownloadError, match="needs huggingface_hub"):
        fineweb.download(1, tmp_path / "x", "r/r")


def test_prepare_from_challenge_export(tmp_path):
    downloader, lister, _ = _fake_repo(tmp_path)
    export = tmp_path / "export"
    fineweb.download(3, export, "r/r", downloader=downloader, lister=lister)
    cfg = _cfg(source="fineweb", corpus=str(export), val_source=str(export),
               tokenizer=str(export / fineweb.TOKENIZER_FILE))
    m = prepare.run(cfg, tmp_path)
    shard_dir = tmp_path / "data" / "shards"
    for p in export.glob("*.bin"):
        assert (shard_dir / p.name).read_bytes() == p.read_bytes()  # unchanged, no retokenizing
        assert (shard_dir / p.name).stat().st_ino == p.stat().st_ino  # hard-linked, not copied
    fixture = shards.read_shard(FIXTURE)
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL_MODEL))
    tables = tokenizer.build_byte_tables(sp, 1024)
    assert m["val_tokens"] == 20000 and m["val_docs"] == 13
    assert m["val_bytes"] == tables.stream_bytes(fixture)
    # the 12 complete documents of the fixture hold exactly their normalized text's bytes
    bos = np.nonzero(fixture == 1)[0]
    texts = read_documents(VAL_DOCS, limit=12)
    assert tables.stream_bytes(fixture[:bos[12]]) == sum(len(t.encode()) for t in texts)
    assert m["train_tokens"] == 3 * 5100 and m["tokenizer_sha256"] == OFFICIAL_SHA


def test_prepare_export_rejects_foreign_shard(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "fineweb_val_000000.bin").write_bytes(FIXTURE.read_bytes())
    shards.write_shard(export / "fineweb_train_000000.bin", [1, 2000])  # id beyond vocab 1024
    cfg = _cfg(source="fineweb", corpus=str(export), val_source=str(export), tokenizer=str(OFFICIAL_MODEL))
    with pytest.raises(shards.ShardError, match=r"fineweb_train_000000\.bin: token id 2000 >= prepare\.vocab_size 1024"):
        prepare.run(cfg, tmp_path)
    assert not (tmp_path / "data" / "shards").exists()
    # val_source pointing at text documents instead of val shards
    (tmp_path / "val").mkdir()
    with pytest.raises(shards.ShardError, match=r"val: no fineweb_val_\*\.bin shards"):
        prepare.run(_cfg(source="fineweb", corpus=str(export), tokenizer=str(OFFICIAL_MODEL)), tmp_path)


# ----------------------------------------------------------------------------- stage entry point


def test_stage_reports_bad_input_without_traceback(tmp_path, monkeypatch, capsys):
    from stages import prepare as stage

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, prepare={"corpus": "nowhere", "tokenizer": "x.model"})
    assert stage.main() == 1
    assert "nowhere: corpus path not found" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "   \n", "hi"], ids=["empty", "whitespace", "near-empty"])
def test_empty_or_near_empty_corpus_is_an_error_naming_it_and_keeps_good_shards(tmp_path, train_texts, val_texts, text):
    _setup_text(tmp_path, train_texts, val_texts)
    prepare.run(_cfg(), tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data" / "shards").iterdir()}
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "corpus.txt").write_text(text)
    with pytest.raises(CorpusError, match=r"small: empty or near-empty corpus: 1 training document\(s\) hold \d+ "
                                          r"tokens of text \(at least 256 needed\)"):
        prepare.run(_cfg(corpus="small"), tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "shards").iterdir()} == before


def test_fineweb_cli_reports_a_broken_params_file_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("prepare:\n  source: [fineweb\n")
    assert fineweb.main(["--train-shards", "1"]) == 1
    assert capsys.readouterr().err.startswith("fineweb: error: params.yaml: not valid YAML")
    (tmp_path / "params.yaml").write_text("prepare:\n  source: fineweb\n")
    assert fineweb.main(["--train-shards", "1"]) == 1
    assert "fineweb: error: params.yaml: missing key(s) prepare.corpus" in capsys.readouterr().err
