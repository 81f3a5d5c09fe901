"""pgolf.evaluate.evaluate / stages.evaluate: the model rebuilt from the artifact alone scores exactly as
the model it came from (lossless artifact) or as its dequantized weights (int6), sliding and
non-sliding; metrics/eval.json keys; stride 0; the torchrun relaunch (2 CPU ranks, gloo) gives
the single-process numbers; every bad input exits 1 with `evaluate: error:` naming the file."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf import config
from pgolf.shared import bpb, checked
from pgolf.compress import artifact
from pgolf.compress.dequant import dequantize_state
from pgolf.config import CompressConfig, EvaluateConfig
from pgolf.shared.byte_tables import ByteTables
from pgolf.shared.shards import write_shard
from pgolf.evaluate.evaluate import Paths, load_model, run
from pgolf.shared.model import GPT
from stages import evaluate as stage
from conftest import CROSS_PATH_RTOL, tiny_model
from test_compress import TOKENIZER, quantized

ROOT = Path(__file__).resolve().parents[1]
CFG = EvaluateConfig(context=16, stride=4, batch_seqs=4, max_tokens=200, device="cpu", compile=True,
                     nproc_per_node=1)
PARAMS = "evaluate:\n  context: 16\n  stride: 4\n  batch_seqs: 4\n  max_tokens: 200\n  device: cpu\n" \
         "  compile: true\n  nproc_per_node: {nproc}\n" + "".join(  # test-time training, n-gram tilt, doc keys: defaults
             f"  {f.name}: {json.dumps(f.default)}\n" for f in dataclasses.fields(EvaluateConfig)
             if f.name.startswith(("ttt_", "ngram_", "doc_")))


def tables(seed=0, sha=TOKENIZER["sha256"]):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 5, (64,), generator=g)
    space = torch.rand(64, generator=g) < 0.4
    boundary = torch.zeros(64, dtype=torch.bool)
    boundary[:2] = True
    base[:2], space[:2] = 0, False
    return ByteTables(base, space, boundary, {"tokenizer_sha256": sha, "vocab_size": 64})


def make_workdir(root: Path, model: GPT, lossless=False, nproc=1) -> Path:
    tensors, meta = quantized(model, lossless)
    blob = artifact.compress(artifact.serialize(tensors, meta), "zstd", CompressConfig(zstd_level=3))
    (root / "artifacts/final").mkdir(parents=True)
    (root / "artifacts/final/model.ptz").write_bytes(blob)
    rng = np.random.default_rng(0)
    toks = rng.integers(2, 64, 301)
    toks[::37] = 1
    write_shard(root / "data/shards/fineweb_val_000000.bin", toks[:150])
    write_shard(root / "data/shards/fineweb_val_000001.bin", toks[150:])
    write_shard(root / "data/shards/fineweb_train_000000.bin", toks[:10])
    tok = root / "data/tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text(json.dumps({"model_file": "tokenizer.model", **TOKENIZER, "source": "t"}))
    tables().save(tok / "byte_tables.pgt")
    (root / "params.yaml").write_text(PARAMS.format(nproc=nproc))
    gate(root)
    return root


def gate(root: Path) -> None:
    """What the params gate writes for the evaluate section of root/params.yaml (ConfigError if bad)."""
    checked.write({"evaluate": config.load("evaluate", root / "params.yaml")}, root)


def run_stage(root: Path) -> dict:
    """`python -m stages.evaluate` in `root` (relaunching itself under torchrun when its params say
    so); -> metrics/eval.json, asserting it ended well."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=root, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads((root / "metrics/eval.json").read_text())


def paths(root: Path) -> Paths:
    return Paths(root / "artifacts/final/model.ptz", root / "data/shards", root / "data/tokenizer",
                 root / "metrics/eval.json")


def val_tokens(root):
    return bpb.truncate(bpb.load_val_tokens(root / "data/shards", 200), 16)


def test_lossless_artifact_scores_exactly_as_the_float_model(tmp_path):
    model = tiny_model(1)
    root = make_workdir(tmp_path, model, lossless=True)
    m = run(CFG, paths(root), progress=False)
    toks = val_tokens(root)
    ref = bpb.eval_sliding(model, toks, tables(), 16, 4, 4, "cpu")
    ref_flat = bpb.eval_nonsliding(model, toks, tables(), 16, 4, "cpu")
    assert m["val_bpb"] == pytest.approx(ref["val_bpb"], abs=1e-12)
    assert m["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-12)
    assert m["val_bpb_nonsliding"] == pytest.approx(ref_flat["val_bpb"], abs=1e-12)
    assert m["scored_tokens"] == 192 == ref_flat["tokens"]  # 200 targets truncated to 12 x 16
    assert m["scored_bytes"] == tables().stream_bytes(toks) == ref["scored_bytes"]
    assert m["windows"] == len(bpb.sliding_windows(192, 16, 4))


def test_int6_artifact_scores_as_its_dequantized_weights(tmp_path):
    model = tiny_model(2)
    root = make_workdir(tmp_path, model)
    m = run(CFG, paths(root), progress=False)
    tensors, meta = quantized(model)
    deq = GPT(model.cfg, train_seq_len=64)
    deq.load_export_state_dict(dequantize_state(tensors, meta))
    ref = bpb.eval_sliding(deq.eval(), val_tokens(root), tables(), 16, 4, 4, "cpu")
    assert m["val_bpb"] == pytest.approx(ref["val_bpb"], abs=1e-12)
    float_ref = bpb.eval_sliding(model, val_tokens(root), tables(), 16, 4, 4, "cpu")
    assert m["val_bpb"] != float_ref["val_bpb"] and abs(m["val_bpb"] - float_ref["val_bpb"]) < 0.05
    written = json.loads((root / "metrics/eval.json").read_text())
    assert written == m
    for key in ("val_loss", "val_bpb", "stride", "context", "scored_tokens", "scored_bytes", "eval_seconds",
                "val_bpb_nonsliding", "val_loss_nonsliding", "windows", "artifact_sha256", "compile_seconds"):
        assert key in written
    assert written["compile_seconds"] == 0.0  # nothing compiles on CPU; on CUDA the warm-up's seconds
    parts = written["load_seconds"] + written["nonsliding_seconds"] + written["sliding_seconds"]
    assert 0 <= parts <= written["eval_seconds"] + 0.003
    assert (written["stride"], written["context"]) == (4, 16)
    assert written["artifact_sha256"] == __import__("hashlib").sha256(
        (root / "artifacts/final/model.ptz").read_bytes()).hexdigest()


def test_stride_zero_is_nonsliding_only(tmp_path):
    root = make_workdir(tmp_path, tiny_model(3))
    m = run(dataclasses.replace(CFG, stride=0), paths(root), progress=False)
    assert m["val_bpb"] == m["val_bpb_nonsliding"] and m["stride"] == 0 and m["windows"] == 12


def test_doc_attention_scores_the_nonsliding_windows_within_documents(tmp_path):
    """evaluate.doc_attention (a doc-packed model, PR #2135's eval_val): val_bpb is bpb's
    within-document score of the artifact's model, not the dense one; it needs stride 0."""
    model = tiny_model(1)
    root = make_workdir(tmp_path, model, lossless=True)  # documents of 37 tokens (BOS every 37)
    dense = run(dataclasses.replace(CFG, stride=0), paths(root), progress=False)
    m = run(dataclasses.replace(CFG, stride=0, doc_attention=True), paths(root), progress=False)
    ref = bpb.eval_nonsliding(model, val_tokens(root), tables(), 16, 4, "cpu", doc_backend="reference")
    assert m["val_bpb"] == m["val_bpb_nonsliding"] == pytest.approx(ref["val_bpb"], abs=1e-12)
    assert abs(m["val_bpb"] - dense["val_bpb"]) > 1e-4 and m["scored_bytes"] == dense["scored_bytes"]
    with pytest.raises(config.ConfigError, match="evaluate.stride must be 0 with evaluate.doc_attention"):
        dataclasses.replace(CFG, doc_attention=True).check()


def test_ngram_tilt_scores_every_pass_tilted_and_only_when_on(tmp_path):
    from pgolf.evaluate import ngram_tilt

    model = tiny_model(1)
    root = make_workdir(tmp_path, model, lossless=True)
    plain = run(CFG, paths(root), progress=False)
    assert not any(k.startswith("ngram") for k in plain)  # off (the default): eval.json as before
    cfg = dataclasses.replace(CFG, ngram_tilt=True, ngram_order=2, ngram_threshold=0.3, ngram_boost=1.5)
    m = run(cfg, paths(root), progress=False)
    toks = val_tokens(root)
    tilt = ngram_tilt.Tilt.for_tokens(toks, 2, 0.3, 1.5)
    ref = bpb.eval_sliding(model, toks, tables(), 16, 4, 4, "cpu", tilt=tilt)
    ref_flat = bpb.eval_nonsliding(model, toks, tables(), 16, 4, "cpu", tilt=tilt)
    assert m["val_bpb"] == pytest.approx(ref["val_bpb"], abs=1e-12) and m["val_bpb"] != plain["val_bpb"]
    assert m["val_bpb_nonsliding"] == pytest.approx(ref_flat["val_bpb"], abs=1e-12)
    assert m["val_bpb_untilted"] == pytest.approx(plain["val_bpb"], abs=1e-12)  # the tilt-off run's, same pass
    assert m["val_loss_untilted"] == pytest.approx(plain["val_loss"], abs=1e-12) and "val_bpb_untilted" not in plain
    assert (m["scored_tokens"], m["scored_bytes"]) == (plain["scored_tokens"], plain["scored_bytes"])  # each once
    assert m["ngram_hinted"] == tilt.hinted > 0 and 0 <= m["ngram_tilt_seconds"] <= m["eval_seconds"]
    parts = m["load_seconds"] + m["ngram_tilt_seconds"] + m["nonsliding_seconds"] + m["sliding_seconds"]
    assert 0 <= parts <= m["eval_seconds"] + 0.003


def test_stage_line_and_summary_name_the_score_without_the_tilt(tmp_path, monkeypatch, capsys):
    root = make_workdir(tmp_path, tiny_model(5), lossless=True)
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("ngram_tilt: false", "ngram_tilt: true")
                      .replace("ngram_order: 16", "ngram_order: 2").replace("ngram_threshold: 0.8", "ngram_threshold: 0.3"))
    gate(root)
    rc, out, err = run_main(root, monkeypatch, capsys)
    m = json.loads((root / "metrics/eval.json").read_text())
    assert rc == 0, err
    assert f"n-gram tilt, {m['val_bpb_untilted']:.5f} without; " in out and m["val_bpb_untilted"] != m["val_bpb"]
    from pgolf.submit.summary import render
    assert f"(sliding; n-gram tilt, {m['val_bpb_untilted']:.4f} without it, context 16" in render(root / "metrics")


def test_load_model_rebuilds_config_and_weights(tmp_path):
    model = tiny_model(4)
    root = make_workdir(tmp_path, model, lossless=True)
    rebuilt, meta = load_model(root / "artifacts/final/model.ptz")
    assert rebuilt.cfg == model.cfg and meta["train_seq_len"] == 64
    for k, v in model.export_state_dict().items():
        assert torch.equal(rebuilt.export_state_dict()[k], v), k


# ----------------------------------------------------------------------------- the stage, bad input


def run_main(root, monkeypatch, capsys):
    monkeypatch.chdir(root)
    rc = stage.main()
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_stage_main_prints_its_result_line_not_the_summary(tmp_path, monkeypatch, capsys):
    """The Quickstart ends with `pgolf summary`; the stage itself must not print the
    summary too (it used to appear twice)."""
    root = make_workdir(tmp_path, tiny_model(5))
    rc, out, err = run_main(root, monkeypatch, capsys)
    assert rc == 0, err
    assert out.count("evaluate: val_bpb") == 1 and "pgolf summary" not in out
    assert json.loads((root / "metrics/eval.json").read_text())["context"] == 16


def _flip_version(p):
    b = bytearray(p.read_bytes())
    b[len(artifact.MAGIC)] += 1
    p.write_bytes(bytes(b))


def _tamper_payload(p):
    codec, raw = artifact.decompress(p.read_bytes())
    raw = bytearray(raw)
    raw[100] ^= 1  # inside the JSON header
    blob = artifact.compress(bytes(raw), "zstd", CompressConfig(zstd_level=3))
    p.write_bytes(p.read_bytes()[:artifact.HEADER_BYTES] + blob[artifact.HEADER_BYTES:])  # old CRC


def _retokenize(root, **kw):
    path = root / "data/tokenizer/tokenizer.json"
    meta = json.loads(path.read_text())
    meta.update(kw)
    path.write_text(json.dumps(meta))


BAD = {
    "other format version": (lambda r: _flip_version(r / "artifacts/final/model.ptz"),
                             "artifacts/final/model.ptz: artifact format version 2 unsupported"),
    "checksum mismatch": (lambda r: _tamper_payload(r / "artifacts/final/model.ptz"),
                          "artifacts/final/model.ptz: checksum mismatch"),
    "truncated": (lambda r: (r / "artifacts/final/model.ptz").write_bytes(
        (r / "artifacts/final/model.ptz").read_bytes()[:-50]),
        "artifacts/final/model.ptz: chunked zstd body: the stream lengths"),  # the defaults (= record profile) chunk zstd
    "foreign": (lambda r: (r / "artifacts/final/model.ptz").write_bytes(b"PK\x03\x04" + bytes(200)),
                "artifacts/final/model.ptz: not a pgolf artifact"),
    "missing artifact": (lambda r: (r / "artifacts/final/model.ptz").unlink(), "model.ptz: artifact not found"),
    "vocab mismatch": (lambda r: _retokenize(r, vocab_size=1024),
                       "model vocab_size 64 but the validation data's tokenizer (data/tokenizer/tokenizer.json) "
                       "has vocab_size 1024"),
    "tokenizer sha mismatch": (lambda r: _retokenize(r, sha256="a" * 64),
                               "the validation shards were made with aaaaaaaaaaaa"),
    "missing byte tables": (lambda r: (r / "data/tokenizer/byte_tables.pgt").unlink(),
                            "data/tokenizer/byte_tables.pgt: byte tables not found"),
    "stale byte tables": (lambda r: tables(sha="b" * 64).save(r / "data/tokenizer/byte_tables.pgt"),
                          "data/tokenizer/byte_tables.pgt: built for tokenizer bbbbbbbbbbbb"),
    "no val shards": (lambda r: [p.unlink() for p in (r / "data/shards").glob("fineweb_val_*")],
                      "data/shards: no fineweb_val_*.bin shards"),
}
BAD_PARAMS = {
    "too few tokens": (("max_tokens: 200", "max_tokens: 10"),
                       "evaluate.max_tokens must be 0 (all) or >= evaluate.context (16), one window, got 10"),
    "bad device": (("device: cpu", "device: gpu"), "evaluate.device must be one of auto, cpu, cuda, got 'gpu'"),
    "bad stride": (("stride: 4", "stride: 17"), "evaluate.stride must be in [0, evaluate.context=16]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_1_naming_the_file(tmp_path, monkeypatch, capsys, case):
    root = make_workdir(tmp_path, tiny_model(6))
    breaker, message = BAD[case]
    breaker(root)
    rc, out, err = run_main(root, monkeypatch, capsys)
    assert rc == 1
    assert err.startswith("evaluate: error: "), err
    assert message in err, err
    assert not (root / "metrics/eval.json").exists()


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_stop_at_the_gate_before_the_stage(tmp_path, case):
    root = make_workdir(tmp_path, tiny_model(6))
    (old, new), message = BAD_PARAMS[case]
    (root / "params.yaml").write_text(PARAMS.format(nproc=1).replace(old, new))
    with pytest.raises(config.ConfigError) as e:
        gate(root)
    assert str(e.value).startswith(f"{root / 'params.yaml'}: {message}")


def test_cli_under_torchrun_two_ranks_matches_one(tmp_path):
    """evaluate.nproc_per_node 2 relaunches through torchrun (gloo on CPU); the windows split over
    the ranks and the all-reduced sums give the single-process metrics."""
    one = make_workdir(tmp_path / "one", tiny_model(7))
    two = make_workdir(tmp_path / "two", tiny_model(7), nproc=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = []
    for root in (one, two):
        p = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=root, capture_output=True, text=True,
                           env=env, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.count("evaluate: val_bpb") == 1  # printed by rank 0 only
        results.append(json.loads((root / "metrics/eval.json").read_text()))
    a, b = results
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for k in ("scored_tokens", "scored_bytes", "windows"):
        assert a[k] == b[k]
    for k in ("val_bpb", "val_loss", "val_bpb_nonsliding"):
        assert a[k] == pytest.approx(b[k], rel=CROSS_PATH_RTOL)  # fp32 batches of other shapes
