"""LQER (pgolf.quantize.lqer, quantize.lqer_*): the factors are the best rank-r approximation of the
quantization error; quantize corrects exactly the top-K matrices by ||W - Q(W)||_F and leaves the
codes alone; the artifact carries the block, evaluation applies it (round trip, bit-exact) and
its bytes count; a misshapen block is an error naming the artifact; bad params are named."""

import json
import re

import pytest
import torch

from _quant_model import trained, write_train_dir
from conftest import tiny_model
from pgolf.quantize import lqer
from pgolf.compress import artifact
from pgolf.compress.compress import build, choose
from pgolf.compress.dequant import dequantize_state
from pgolf.config import CompressConfig, ConfigError
from pgolf.evaluate.evaluate import load_model
from pgolf.shared.rowquant import dequantize
from test_compress import quantized
from test_quantize import load_quant, qcfg, run_in, set_params, stage_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")
LQ = dict(lqer_enabled=True, lqer_top_k=3, lqer_rank=4, lqer_bits=4)


def test_factors_are_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    err = torch.randn(40, 24, generator=g) * torch.logspace(0, -2, 24)
    A, B = lqer.factorize(err, 5)
    assert A.shape == (40, 5) and B.shape == (5, 24)
    S = torch.linalg.svdvals(err.double())
    assert float((err - A @ B).norm()) == pytest.approx(float(S[5:].norm()), rel=1e-5)  # Eckart-Young
    assert lqer.factorize(err, 100)[0].shape == (40, 24)  # rank capped at min(out, in)


def test_row_codes_round_trip_within_half_a_step():
    x = torch.randn(6, 10) * torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0, 0.0])[:, None]
    q, s = lqer.quantize_rows(x, 4)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 7 and s.dtype == torch.float16 and (s > 0).all()
    assert ((q.float() * s.float()[:, None] - x).abs() <= s.float()[:, None] * 0.5 + 1e-3 * x.abs()).all()


def test_select_takes_the_k_largest_in_order():
    assert lqer.select({"a": 1.0, "b": 3.0, "c": 2.0, "d": 3.0}, 2) == ["b", "d"]
    assert lqer.select({"a": 1.0}, 3) == ["a"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The quantize stage on the trained micro model, without and with LQER (same GPTQ codes)."""
    out = []
    for name, kw in (("plain", {}), ("lqer", LQ)):
        root = tmp_path_factory.mktemp(name)
        write_train_dir(root)
        m = run_in(root, qcfg(**kw))
        out.append((root, m))
    return out


def test_quantize_corrects_the_top_k_errors_and_leaves_the_codes(pair):
    (r0, m0), (r1, m1) = pair
    t0, meta0 = load_quant(r0)
    t1, meta1 = load_quant(r1)
    w = trained()[0]
    errs = {n: float((w[n].float() - dequantize(t0[f"{n}.q"], t0[f"{n}.scale"])).norm())
            for n, i in meta0["quant"].items() if i["type"] in ("int6", "int8")}
    top = sorted(errs, key=errs.get, reverse=True)[:3]
    chosen = [n for n, i in meta1["quant"].items() if "lqer" in i]
    assert sorted(chosen) == sorted(top) and all(meta1["quant"][n]["lqer"] == {"rank": 4, "bits": 4} for n in chosen)
    assert set(t1) - set(t0) == {n + s for n in chosen for s in lqer.SUFFIXES}
    assert all(torch.equal(t0[k], t1[k]) for k in t0)  # codes and scales untouched
    table = {r["name"]: r for r in json.loads((r1 / "artifacts/quant/table.json").read_text())["tensors"]}
    for n in chosen:
        assert table[n]["lqer_error"] == pytest.approx(errs[n], rel=1e-5)
        assert table[n]["lqer_error_after"] < 0.95 * table[n]["lqer_error"]
    assert m1["lqer_tensors"] == 3 and m1["lqer_bytes_raw"] == sum(table[n]["lqer_bytes_raw"] for n in chosen)
    assert m1["raw_bytes"] == m0["raw_bytes"] + m1["lqer_bytes_raw"] and "lqer_tensors" not in m0


def test_artifact_round_trip_applies_the_correction_and_its_bytes_count(pair, tmp_path):
    (r0, _), (r1, _) = pair
    t0, meta0 = load_quant(r0)
    t1, meta1 = load_quant(r1)
    cfg = CompressConfig(lzma_preset=6, zstd_level=19)
    blob0, blob1 = (choose(artifact.serialize(t, m), cfg)[1] for t, m in ((t0, meta0), (t1, meta1)))
    assert len(blob1) > len(blob0) + 100  # the factors are in the file, so in model_bytes
    back, meta = artifact.loads_artifact(blob1)
    sd1, sd0 = dequantize_state(back, meta), dequantize_state(t0, meta0)
    w = trained()[0]
    for n, info in meta["quant"].items():
        if "lqer" not in info:
            assert torch.equal(sd1[n], sd0[n])
            continue
        want = dequantize(t1[f"{n}.q"], t1[f"{n}.scale"]) + lqer.correction(t1, n, tuple(t1[f"{n}.q"].shape), 4)
        assert torch.equal(sd1[n], want)
        assert (sd1[n] - w[n]).norm() < (sd0[n] - w[n]).norm()


def _lqer_artifact(path, rank_stored=4, rank_meta=4):
    model = tiny_model(3)
    tensors, meta = quantized(model)
    name = "blocks.0.attn.c_q.weight"
    err = model.export_state_dict()[name] - dequantize(tensors[f"{name}.q"], tensors[f"{name}.scale"])
    tensors.update(lqer.pack(name, err, rank_stored, 4))
    meta["quant"][name]["lqer"] = {"rank": rank_meta, "bits": 4}
    path.write_bytes(artifact.compress(artifact.serialize(tensors, meta), "zstd", CompressConfig(zstd_level=3)))
    return model, tensors, name


def test_evaluate_rebuilds_the_corrected_weights(tmp_path):
    model, tensors, name = _lqer_artifact(tmp_path / "model.ptz")
    rebuilt, _ = load_model(tmp_path / "model.ptz")
    want = dequantize(tensors[f"{name}.q"], tensors[f"{name}.scale"]) + lqer.correction(tensors, name, (32, 32), 4)
    assert torch.equal(rebuilt.export_state_dict()[name], want)


def test_misshapen_block_is_an_error_naming_the_artifact(tmp_path):
    _lqer_artifact(tmp_path / "model.ptz", rank_stored=3, rank_meta=4)
    with pytest.raises(artifact.ArtifactError, match=r"model\.ptz: cannot rebuild the model: artifact: LQER block of "
                                                     r"'blocks\.0\.attn\.c_q\.weight': lqer_a has shape \(32, 3\), "
                                                     r"expected \(32, 4\)"):
        load_model(tmp_path / "model.ptz")


@pytest.mark.parametrize("key,value,match", [
    ("lqer_rank", 0, "quantize.lqer_rank must be >= 1, got 0"),
    ("lqer_top_k", 0, "quantize.lqer_top_k must be >= 1, got 0"),
    ("lqer_bits", 9, "quantize.lqer_bits must be in the supported range [2, 8], got 9"),
])
def test_bad_lqer_params(stage_dir, key, value, match):  # noqa: F811
    with pytest.raises(ConfigError, match=re.escape(match)):
        set_params(stage_dir, **{key: value})
    assert (stage_dir / "artifacts" / "quant" / "quant.pgt").read_bytes() == b"previous"


def test_stage_with_lqer_and_pruning_counts_the_block(stage_dir, capsys):  # noqa: F811
    from stages import quantize as stage

    set_params(stage_dir, lqer_enabled=True, lqer_top_k=2)
    assert stage.main() == 0
    m = json.loads((stage_dir / "metrics/quant.json").read_text())
    tensors, meta = load_quant(stage_dir)
    assert m["lqer_tensors"] == 2 and sum("lqer" in i for i in meta["quant"].values()) == 2
    size = len(choose(artifact.serialize(tensors, meta), CompressConfig())[1])
    target = size + 1000 - 600  # 600 bytes to prune, counting the factors (code: 1,000 bytes)
    sm = build(CompressConfig(target_bytes=target, prune_slack_bytes=0), b"#" * 1000, stage_dir / "artifacts/quant/quant.pgt",
               stage_dir / "final", stage_dir / "size.json")
    assert sm["pruned_values"] > 0 and sm["total_bytes"] <= target
    back, meta2 = artifact.read_artifact(stage_dir / "final" / "model.ptz")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors if ".lqer" in k)  # the factors are never pruned
