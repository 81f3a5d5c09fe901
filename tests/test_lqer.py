"""LQER (pgolf.quantize.lqer, quantize.lqer_*): the factors are the best rank-r approximation of the
quantization error; quantize corrects exactly the top-K matrices by ||W - Q(W)||_F and leaves the
codes alone; the artifact carries the block, evaluation applies it (round trip, bit-exact) and
its bytes count; a misshapen block is an error naming the artifact; bad params are named. The
asymmetric form (quantize.lqer_asym, PR #2135): its codes against a hand computation and against
the script's own packer and dequantizer, its error and bytes against the symmetric form, and the
quantize -> artifact -> dequantize round trip."""

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
    ("lqer_group", 0, "quantize.lqer_group must be >= 1, got 0"),
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


# ----------------------------------------------------------------------------- the asymmetric form

ASYM = dict(LQ, lqer_asym=True, lqer_group=32)


def test_asym_codes_and_scales_are_the_hand_rule():
    """A: 2-bit codes in [-2, 1], one fp16 scale max|A| / 1.5; B: 4-bit codes in [-8, 7], one fp16
    scale max|group| / 7.5 per `group` values of B flattened row-major; the correction is A B."""
    A = torch.tensor([[0.3, -0.15], [0.0, 0.6], [-0.6, 0.1]])  # (3, 2): max 0.6 -> scale fp16(0.4)
    B = torch.tensor([[0.75, -0.3, 0.1, 0.0], [-1.5, 0.2, 0.0, 0.7]])  # (2, 4): groups of 4 = rows
    qa, sa, qb, sb = lqer.quantize_asym(A, B, 4)
    assert torch.equal(qa, torch.tensor([[1, 0], [0, 1], [-2, 0]], dtype=torch.int8))  # 1.5 -> 2 -> 1; -1.5 -> -2
    assert torch.equal(sa, torch.tensor([0.4]).half())
    assert torch.equal(qb, torch.tensor([[7, -3, 1, 0], [-8, 1, 0, 4]], dtype=torch.int8))  # 7.5 -> 8 -> 7
    assert torch.equal(sb, torch.tensor([0.1, 0.2]).half())
    a = qa.float() * float(torch.tensor(0.4).half())
    b = qb.float() * torch.tensor([0.1, 0.2]).half().float()[:, None]
    block = dict(zip(("w" + s for s in lqer.SUFFIXES), (qa, sa, qb, sb)))
    assert torch.equal(lqer.correction_asym(block, "w", (3, 4), 2, 4), a @ b)
    _, _, qb8, sb8 = lqer.quantize_asym(A, B, 8)  # one group over both rows: scale max 1.5 / 7.5
    assert torch.equal(sb8, torch.tensor([0.2]).half()) and int(qb8[0, 0]) == 4


@pytest.mark.parametrize("group", [32, 64])
def test_asym_pack_and_dequantization_match_the_pr2135_anchor(group):
    """The same factors through the script's _lqer_pack_asym: the same codes and fp16 scales; the
    artifact's dequantization (dequantize_state) and the script's dequantize_mixed give the same weight."""
    from _anchors import load_script

    script = load_script("pr2135", {"VOCAB_SIZE": "8192"})
    g = torch.Generator().manual_seed(7)
    W = torch.randn(96, 128, generator=g) * 0.05
    q = torch.clamp(torch.round(W / 0.004), -31, 31).to(torch.int8)
    s = torch.full((96,), 0.004).half()
    A, B = lqer.factorize_us(W - q.float() * s.float()[:, None], 4)
    mine = lqer.quantize_asym(A, B, group)
    ref = script._lqer_pack_asym(A, B, group)
    assert all(torch.equal(m.reshape(r.shape), r) for m, r in zip(mine, ref))
    name = "blocks.0.mlp.fc.weight"
    tensors = {f"{name}.q": q, f"{name}.scale": s, **dict(zip((name + x for x in lqer.SUFFIXES), mine))}
    meta = {"quant": {name: {"type": "int6", "bits": 6, "method": "gptq",
                             "lqer": {"rank": 4, "form": "asym", "group": group}}}}
    result = {f"{name}.q": q, f"{name}.scale": s, f"{name}.lqA_a": ref[0], f"{name}.lqAs_a": ref[1],
              f"{name}.lqB_a": ref[2], f"{name}.lqBs_a": ref[3]}
    theirs = script.dequantize_mixed(result, {name: "gptq (int6)+lqer_asym"}, {name: W})[name]
    assert torch.allclose(dequantize_state(tensors, meta)[name], theirs, rtol=0, atol=1e-7)


def _gptq_errors() -> dict[str, torch.Tensor]:
    """W - Q(W) of three trained micro matrices under the sigma rule (PR #2135's int6 GPTQ)."""
    from pgolf.quantize.gptq import GPTQSpec, gptq_batch

    w, h, _ = trained()
    out = {}
    for n in ("blocks.0.mlp.fc.weight", "blocks.1.attn.c_q.weight", "blocks.0.mlp.proj.weight"):
        r = gptq_batch(w[n][None], h[n][None], GPTQSpec(qmax=31, quantiles=(), sigmas=12.85))[0]
        out[n] = w[n] - dequantize(r.q, r.scale)
    return out


def test_asym_corrects_less_than_symmetric_at_equal_rank_in_fewer_bytes():
    """Measured at rank 4, group 32 (||E||_F before -> after asym / after symmetric 4-bit, bytes):
    mlp.fc 1.741 -> 1.573 / 1.485 (1042 / 1416 B), attn.c_q 1.492 -> 1.318 / 1.232 (530 / 648 B),
    mlp.proj 0.678 -> 0.642 / 0.604 (1074 / 1160 B): the int2 A costs accuracy, the form saves bytes.
    The script's own path (fp32 SVD, then _lqer_pack_asym) leaves the same error to 0.5 %."""
    from _anchors import load_script

    script = load_script("pr2135", {"VOCAB_SIZE": "8192"})
    nbytes = lambda block: sum(t.numel() * t.element_size() for t in block.values())  # noqa: E731
    for n, E in _gptq_errors().items():
        shape = tuple(E.shape)
        asym, sym = lqer.pack_asym(n, E, 4, 32), lqer.pack(n, E, 4, 4)
        left_asym = float((E - lqer.correction_asym(asym, n, shape, 4, 32)).norm())
        left_sym = float((E - lqer.correction(sym, n, shape, 4)).norm())
        assert left_sym <= left_asym < 0.97 * float(E.norm()), (n, left_sym, left_asym)
        assert nbytes(asym) < nbytes(sym)
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        qa, sa, qb, sb = script._lqer_pack_asym((U[:, :4] * S[:4]).contiguous(), Vh[:4].contiguous(), 32)
        theirs = (qa.float() * float(sa)) @ (qb.reshape(-1, 32).float() * sb.float()[:, None]).reshape(qb.shape)
        assert float((E - theirs).norm()) == pytest.approx(left_asym, rel=0.005)


def test_pack_for_falls_back_to_symmetric_where_the_group_does_not_divide():
    E = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    block, entry = lqer.pack_for("w", E, 4, 4, group=32)  # 4 x 6 = 24 values of B: no group of 32
    assert entry == {"rank": 4, "bits": 4} and block["w.lqer_b_scale"].shape == (4,)
    block, entry = lqer.pack_for("w", E, 4, 4, group=8)
    assert entry == {"rank": 4, "form": "asym", "group": 8} and block["w.lqer_b_scale"].shape == (3,)
    assert torch.equal(lqer.correction_for(block, "w", (10, 6), entry), lqer.correction_asym(block, "w", (10, 6), 4, 8))


@pytest.fixture(scope="module")
def asym_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("asym")
    write_train_dir(root)
    return root, run_in(root, qcfg(**ASYM))


def test_quantize_stores_the_asym_form_and_the_artifact_round_trip_is_exact(pair, asym_run):
    (r0, _), _ = pair
    root, m = asym_run
    t0, _ = load_quant(r0)
    t1, meta1 = load_quant(root)
    chosen = [n for n, i in meta1["quant"].items() if "lqer" in i]
    assert len(chosen) == 3 and all(meta1["quant"][n]["lqer"] == {"rank": 4, "form": "asym", "group": 32}
                                    for n in chosen)
    for n in chosen:
        out, inp = t1[f"{n}.q"].shape
        assert t1[f"{n}.lqer_a_scale"].shape == (1,) and t1[f"{n}.lqer_b_scale"].shape == (4 * inp // 32,)
        assert -2 <= int(t1[f"{n}.lqer_a"].min()) and int(t1[f"{n}.lqer_a"].max()) <= 1
        assert -8 <= int(t1[f"{n}.lqer_b"].min()) and int(t1[f"{n}.lqer_b"].max()) <= 7
    assert all(torch.equal(t0[k], t1[k]) for k in t0)  # codes and scales untouched
    raw = artifact.serialize(t1, meta1)
    back, meta = artifact.loads_artifact(artifact.compress(raw, "zstd", CompressConfig(zstd_level=3)))
    assert artifact.serialize(back, meta) == raw  # byte-identical round trip
    sd = dequantize_state(back, meta)
    w = trained()[0]
    for n in chosen:
        shape = tuple(t1[f"{n}.q"].shape)
        want = dequantize(t1[f"{n}.q"], t1[f"{n}.scale"]) + lqer.correction_asym(t1, n, shape, 4, 32)
        assert torch.equal(sd[n], want)
        assert (sd[n] - w[n]).norm() < (dequantize(t1[f"{n}.q"], t1[f"{n}.scale"]) - w[n]).norm()
    assert m["lqer_error_after"] < m["lqer_error_before"]


def test_a_bad_asym_entry_is_an_artifact_error(asym_run):
    root, _ = asym_run
    tensors, meta = load_quant(root)
    name = next(n for n, i in meta["quant"].items() if "lqer" in i)
    meta["quant"][name]["lqer"] = {"rank": 4, "form": "asym"}  # no group
    with pytest.raises(artifact.ArtifactError, match="bad LQER entry"):
        dequantize_state(tensors, meta)
    meta["quant"][name]["lqer"] = {"rank": 4, "form": "asym", "group": 40}  # 4 x in (64 or 192): no multiple of 40
    with pytest.raises(artifact.ArtifactError, match="does not divide"):
        dequantize_state(tensors, meta)
