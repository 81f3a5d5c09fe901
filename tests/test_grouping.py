"""Grouped serialisation (compress.layout "grouped", pgolf.compress.grouping): codes of one role grouped,
rows ordered, undone at load bit-exactly; deterministic; a corrupt permutation is an error naming
the file; an unknown layout is named; the compress stage writes it and evaluation reads it."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_model
from pgolf.compress import artifact as A
from pgolf.compress.dequant import dequantize_state
from pgolf.quantize import lqer
from pgolf.compress import grouping
from pgolf import config
from pgolf.config import CompressConfig, ConfigError
from pgolf.shared.rowquant import dequantize
from test_artifact import bits_equal, every_dtype
from test_compress import build, quantized, workdir  # noqa: F401 - fixture

FAST = CompressConfig(lzma_preset=6, zstd_level=19)
GROUPED = CompressConfig(layout="grouped")


def codes_and_meta():
    model = tiny_model(5)
    tensors, meta = quantized(model)
    name = "blocks.1.mlp.fc.weight"
    err = model.export_state_dict()[name] - dequantize(tensors[f"{name}.q"], tensors[f"{name}.scale"])
    tensors.update(lqer.pack(name, err, 2, 4))
    meta["quant"][name]["lqer"] = {"rank": 2, "bits": 4}
    return tensors, meta


def test_roles_and_row_order():
    assert grouping.role("blocks.10.attn.c_q.weight.q") == "blocks.*.attn.c_q.weight.q"
    assert grouping.role("tok_emb.weight.q") == "tok_emb.weight.q"
    rows = np.array([[0, 0], [9, 9], [1, 1], [8, 9], [0, 1]], dtype=np.uint8)
    perm = grouping.row_order(rows)
    assert sorted(perm.tolist()) == list(range(5))
    ordered = rows[perm]
    assert {tuple(r) for r in ordered[:3]} == {(0, 0), (1, 1), (0, 1)} or {tuple(r) for r in ordered[2:]} == {
        (0, 0), (1, 1), (0, 1)}  # the small rows sit together


def test_grouped_round_trip_is_bit_exact_and_deterministic():
    tensors, meta = codes_and_meta()
    raw = A.serialize(tensors, meta, GROUPED)
    assert raw == A.serialize(tensors, meta, GROUPED) and raw != A.serialize(tensors, meta)
    back, meta2 = A.deserialize(raw)
    assert list(back) == list(tensors) and all(bits_equal(back[k], v) for k, v in tensors.items())
    assert dequantize_state(back, meta2).keys() == dequantize_state(tensors, meta).keys()
    stored, header = __import__("pgolf.shared.tensorfile", fromlist=["loads"]).loads(raw, kind="artifact")
    groups = [k for k in stored if k.startswith(grouping.GROUP)]
    encs = {e["name"]: e["enc"] for e in header["meta"]["layout"]}
    assert encs["blocks.0.mlp.fc.weight.q"] == encs["blocks.1.mlp.fc.weight.q"] == "group"
    assert len(groups) < sum(e == "group" for e in encs.values())  # layers share blocks
    every = every_dtype()
    back, _ = A.deserialize(A.serialize(every, {"quant": {}}, GROUPED))
    assert all(bits_equal(back[k], v) for k, v in every.items())


def test_corrupt_permutation_names_the_file():
    tensors, meta = codes_and_meta()
    from pgolf.shared import tensorfile
    stored, header = tensorfile.loads(A.serialize(tensors, meta, GROUPED), kind="artifact")
    k = next(k for k in stored if k.startswith(grouping.PERM))
    stored[k] = torch.zeros_like(stored[k])
    raw = tensorfile.dumps(stored, kind="artifact", meta=header["meta"])
    with pytest.raises(A.ArtifactError, match=r"m\.ptz: inconsistent layout table \(ValueError: group \d+: "
                                              r"permutation does not fit"):
        A.deserialize(raw, "m.ptz")


def test_unknown_layout_is_named():
    with pytest.raises(ConfigError, match="compress.layout must be one of flat, grouped, pergroup, got 'sorted'"):
        config.from_dict("compress", {"layout": "sorted"})


def test_compress_stage_writes_the_grouped_layout(workdir):  # noqa: F811
    flat = build(workdir)
    flat_tensors, _ = A.read_artifact(workdir / "artifacts/final/model.ptz")
    grouped = build(workdir, dataclasses.replace(FAST, layout="grouped"))
    tensors, _ = A.read_artifact(workdir / "artifacts/final/model.ptz")
    assert grouped["raw_bytes"] > flat["raw_bytes"]  # the permutations are stored too
    assert list(tensors) == list(flat_tensors) and all(torch.equal(tensors[k], flat_tensors[k]) for k in tensors)
