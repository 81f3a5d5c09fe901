"""Pruning in the compress stage (pgolf.compress.compress + pgolf.compress.prune) on the quantize stage's output of a
really trained micro model: a forced target is met at or under it at the real size; slack 0 is the
exact contract (n fits, n - 1 does not); reruns are byte-identical; the search uses few real
compressions; an unreachable target names the smallest size; missing Hessian diagonals are named."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from _quant_model import write_train_dir
from conftest import single_thread
from pgolf import config
from pgolf.shared import tensorfile
from pgolf.compress import artifact, pergroup, prune
from pgolf.compress import compress as C
from pgolf.quantize import quantize as Q
from pgolf.config import CompressConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CODE = b"#" * 88_000  # a stand-in for the packed train_gpt.py
CFG = CompressConfig(codec="zstd", zstd_level=19, prune_slack_bytes=0)


@pytest.fixture(scope="module")
def quant(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("q")
    write_train_dir(root)
    with single_thread():
        Q.run(config.from_dict("quantize", {"passthrough_max_numel": 512}), root / "artifacts" / "train",
              root / "artifacts" / "quant", root / "metrics" / "quant.json")
    return root / "artifacts" / "quant" / "quant.pgt"


def build(quant: Path, out: Path, cfg: CompressConfig) -> dict:
    return C.build(cfg, CODE, quant, out / "final", out / "size.json")


def size_of(tensors: dict, meta: dict, cfg: CompressConfig) -> int:
    return len(artifact.compress(artifact.serialize(tensors, meta), cfg.codec, cfg)) + len(CODE)


def test_unpruned_fits_and_is_not_pruned(quant, tmp_path):
    m = build(quant, tmp_path, CFG)
    assert m["pruned_values"] == 0 and m["prune_compressions"] == 0 and m["real_compressions"] == 2


def test_forced_target_exact_contract_and_byte_identical_reruns(quant, tmp_path):
    full = build(quant, tmp_path / "a", CFG)["total_bytes"]
    cfg = dataclasses.replace(CFG, target_bytes=full - 1500, prune_slack_bytes=0)
    m = build(quant, tmp_path / "b", cfg)
    n = m["pruned_values"]
    assert 0 < n < m["prune_candidates"] and m["total_bytes"] <= cfg.target_bytes
    ptz = (tmp_path / "b" / "final" / "model.ptz").read_bytes()
    assert len(ptz) + len(CODE) == m["total_bytes"]  # the real size of the file written
    # exact: the same cost order with one value fewer does not fit
    tensors, header = tensorfile.load(quant, kind="quantized")
    meta = header["meta"]
    hd = C.load_hdiag(quant.parent / C.HDIAG)
    codes, cands = C.candidates(tensors, meta, hd)
    assert sorted(codes) == sorted(f"{k}.q" for k, i in meta["quant"].items() if i["type"] == "int6")
    back, _ = artifact.read_artifact(tmp_path / "b" / "final" / "model.ptz")
    assert all(torch.equal(back[k], v) for k, v in prune.apply(codes, cands, n).items())
    assert size_of({**tensors, **prune.apply(codes, cands, n - 1)}, meta, cfg) > cfg.target_bytes
    assert m["prune_compressions"] == len(m["prune_probes"]) - 1 <= 20
    # rerun: the same file
    again = build(quant, tmp_path / "c", cfg)
    assert again["model_sha256"] == m["model_sha256"] == hashlib.sha256(ptz).hexdigest()
    assert again["prune_probes"] == m["prune_probes"]


def test_slack_stops_at_the_first_fit_with_few_compressions(quant, tmp_path):
    full = build(quant, tmp_path / "a", CFG)["total_bytes"]
    cfg = dataclasses.replace(CFG, target_bytes=full - 3000, prune_slack_bytes=300)
    m = build(quant, tmp_path / "b", cfg)
    assert m["total_bytes"] <= cfg.target_bytes and m["prune_compressions"] <= 4
    assert all(p["total_bytes"] > cfg.target_bytes for p in m["prune_probes"][:-1])  # stopped at the first fit
    assert json.loads((tmp_path / "b" / "size.json").read_text()) == m
    assert build(quant, tmp_path / "c", cfg)["model_sha256"] == m["model_sha256"]


def test_pergroup_probes_compress_each_piece_by_its_codec_of_the_unpruned_body(quant, tmp_path, monkeypatch):
    """The per-group codec choice is made once, on the unpruned body: every probe of the search then
    encodes each piece once (not once per codec), and the file written reads back as the pruned codes."""
    cfg = dataclasses.replace(CFG, codec="auto", layout="pergroup", lzma_preset=6, brotli_quality=9,
                              pergroup_codecs=("lzma", "zstd", "brotli", "ppmd"))  # lrzip's joined piece: test_pergroup
    full = build(quant, tmp_path / "a", cfg)["total_bytes"]
    calls, real = [], pergroup._encode_one
    monkeypatch.setattr(pergroup, "_encode_one", lambda data, codec, c: calls.append(codec) or real(data, codec, c))
    m = build(quant, tmp_path / "b", dataclasses.replace(cfg, target_bytes=full - 1500))
    ptz = (tmp_path / "b" / "final" / "model.ptz").read_bytes()
    k = len(pergroup.describe(ptz[artifact.HEADER_BYTES:]))
    assert m["prune_compressions"] >= 1 and m["total_bytes"] <= full - 1500
    assert len(calls) == k * (len(pergroup.available(cfg.pergroup_codecs)) + m["prune_compressions"])
    tensors, header = tensorfile.load(quant, kind="quantized")
    codes, cands = C.candidates(tensors, header["meta"], C.load_hdiag(quant.parent / C.HDIAG))
    back, _ = artifact.read_artifact(tmp_path / "b" / "final" / "model.ptz")
    assert all(torch.equal(back[key], v) for key, v in prune.apply(codes, cands, m["pruned_values"]).items())


def test_unreachable_target_names_the_smallest_size(quant, tmp_path):
    with pytest.raises(prune.PruneError, match="compress.target_bytes=90,000 is unreachable.*smallest reachable"):
        build(quant, tmp_path, dataclasses.replace(CFG, target_bytes=90_000))
    assert not (tmp_path / "final").exists()


def test_missing_hessian_diagonals_are_named(quant, tmp_path):
    q = tmp_path / "quant" / "quant.pgt"
    q.parent.mkdir()
    q.write_bytes(quant.read_bytes())
    with pytest.raises(C.CompressError, match="hdiag.pgt: not found"):
        build(q, tmp_path, dataclasses.replace(CFG, target_bytes=100_000))


def test_quantize_and_compress_agree_on_the_diagonals_file():
    assert (Q.HDIAG, Q.HDIAG_KIND) == (C.HDIAG, C.HDIAG_KIND)


def test_entropy_predictor_is_exact_order0_and_nonincreasing():
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(64, 32, generator=g) * 2).round().clamp(-31, 31).to(torch.int8)
    c = prune.collect({"a.q": q}, {"a.q": torch.ones(64).half()}, {"a.q": None})
    P = prune.Entropy({"a.q": q}, c)

    def order0(codes: torch.Tensor) -> float:
        p = torch.bincount(codes.reshape(-1).long() + 128, minlength=256).double()
        p = p[p > 0] / codes.numel()
        return float(-(p * p.log2()).sum()) * codes.numel() / 8

    for n in (0, 1, c.total // 3, c.total):
        assert P(n) == pytest.approx(order0(prune.apply({"a.q": q}, c, n)["a.q"]), rel=1e-12)
    vals = [P(n) for n in range(0, c.total + 1, 7)]
    assert all(b <= a + 1e-9 for a, b in zip(vals, vals[1:]))
