"""bench/bench_attention.py on CPU: what a run measures where (`plan`), the check of a backend
against the reference before it is timed, the ranking that feeds docattn.AUTO_ORDER, the varlen
layouts, and the whole bench at tiny shapes (--smoke)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_attention as B  # noqa: E402
from pgolf.shared import docattn as D  # noqa: E402
from pgolf.shared.shards import BOS_ID, write_shard  # noqa: E402


def test_plan_on_a_cpu_is_sdpa_and_the_reference():
    p = B.plan("cpu", ["uniform", "docs"])
    assert p == {"dense": ["sdpa_default_gqa"], "varlen": {"uniform": ["reference"], "docs": ["reference"]}}
    assert B.plan("cpu", ["docs"], with_dense=False)["dense"] == []


def test_plan_on_a_gpu_with_flash_attention_4_times_it_last_for_dense_rows(monkeypatch):
    """FA4's dense variants come after every SDPA and flex variant (the SDPA one swaps aten's flash
    kernels process-wide, and bench_dense restores torch's own after it)."""
    monkeypatch.setattr(D, "available", lambda device: ["reference", "varlen", "flex", "fa4"])
    monkeypatch.setattr(B, "fa4_dense", lambda device, registered: list(B.FA4_DENSE) if registered else ["cute_fa4_gqa"])
    p = B.plan("cuda", ["docs"])
    assert p["dense"][-3:] == ["flex_gqa", "sdpa_fa4_gqa", "cute_fa4_gqa"] and len(p["dense"]) == 9
    assert p["varlen"] == {"docs": ["varlen", "flex", "flex_autotune", "fa4", "reference"]}
    monkeypatch.setattr(D, "available", lambda device: ["reference", "varlen", "flex"])  # not in torch's registry
    assert B.plan("cuda", ["docs"])["dense"][-2:] == ["flex_gqa", "cute_fa4_gqa"]


def test_fa4_dense_needs_a_hopper_or_blackwell_gpu_and_the_package(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert B.fa4_dense("cuda", True) == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)  # import fails: not installed
    assert B.fa4_dense("cuda", True) == []
    for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):  # installed
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    assert B.fa4_dense("cuda", True) == ["sdpa_fa4_gqa", "cute_fa4_gqa"]
    assert B.fa4_dense("cuda", False) == ["cute_fa4_gqa"]


def test_check_passes_the_reference_and_fails_a_wrong_output_or_gradient():
    g = torch.Generator().manual_seed(0)
    out, grads = torch.randn(8, 2, 4, generator=g), tuple(torch.randn(8, 2, 4, generator=g) for _ in range(3))
    row = B.check(out, grads, out.clone(), tuple(t.clone() for t in grads))
    assert row["ok"] and row["max_abs_err_out"] == 0 and row["rel_err_dk"] == 0
    assert not B.check(out + 0.1, grads, out, grads)["ok"]
    bad = (grads[0], grads[1] * 1.1, grads[2])
    row = B.check(out, bad, out, grads)
    assert not row["ok"] and row["rel_err_dk"] == pytest.approx(0.1 * float(grads[1].abs().max()) / float(grads[1].abs().max()))
    assert B.check(out.bfloat16(), grads, out, grads)["ok"]  # bf16 rounding is within the tolerance


def test_ranking_orders_the_timed_backends_per_layout():
    rows = [{"layout": "docs", "backend": "varlen", "ms_fwd_bwd": 3.0},
            {"layout": "docs", "backend": "flex", "ms_fwd_bwd": 2.0},
            {"layout": "docs", "backend": "fa4", "ok": False},
            {"layout": "docs", "backend": "fa3", "error": "ImportError"},
            {"layout": "uniform", "backend": "reference", "ms_fwd_bwd": 9.0}]
    assert B.ranking(rows) == {"docs": ["flex", "varlen"], "uniform": ["reference"]}


def test_layouts(tmp_path):
    assert B.layout_starts("uniform", 98_304, 2048).tolist() == list(range(0, 98_304, 2048))
    docs = B.layout_starts("docs", 98_304, 2048)
    assert docs[0] == 0 and (np.diff(docs) > 0).all() and docs[-1] < 98_304
    assert np.array_equal(docs, B.layout_starts("docs", 98_304, 2048))  # seeded
    lengths = D.segment_lengths(D.build_cu_seqlens(docs, 98_304, 2048))
    assert 300 < np.median(lengths) < 1200 and lengths.max() == 2048
    toks = np.full(100, 7, np.uint16)
    toks[[0, 10, 60]] = BOS_ID
    write_shard(tmp_path / "s.bin", toks)
    assert B.layout_starts("shard", 50, 16, shard=str(tmp_path / "s.bin")).tolist() == [0, 10]
    with pytest.raises(ValueError, match="needs --shard"):
        B.layout_starts("shard", 50, 16)


def test_the_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "a.json"
    B.main(["--smoke", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["device"] == "cpu" and d["smoke"] and d["torch"] == torch.__version__
    assert [r["variant"] for r in d["dense"]] == ["sdpa_default_gqa"]
    assert [(r["layout"], r["backend"], r["ok"]) for r in d["varlen"]] == [("uniform", "reference", True),
                                                                           ("docs", "reference", True)]
    assert all(r["ms_fwd_bwd"] > 0 for r in d["varlen"]) and d["ranking"] == {"uniform": ["reference"],
                                                                            "docs": ["reference"]}
    assert d["varlen"][0]["segments"] == 8 and d["varlen"][0]["cu_entries"] == 64
