"""The users' DVC workflows, end to end, in a temporary copy of the repo at a micro config.

- `dvc repro` runs the whole pipeline and writes every contract metric key;
- `dvc exp run -S quantize.<p>=...` reruns quantize -> compress -> evaluate, never prepare/train;
  setting the value back restores the earlier results from the run-cache without recomputing;
- `dvc metrics diff` / `params diff` / `plots diff` between two branches show the expected keys
  and differences (checked in the --json output: DVC exits 0 even when it cannot read metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _dvc_repo import dvc as _dvc, micro_repo, run as _run, set_params as _set_params

pytestmark = pytest.mark.slow

CONTRACT = {
    "prepare": ["vocab_size", "train_tokens", "val_tokens", "val_bytes", "train_docs", "val_docs"],
    "train": ["steps", "train_seconds", "tokens_per_second", "world_size", "val_bpb_float", "peak_memory_mb"],
    "quant": ["int6_tensors", "passthrough_tensors", "pruned_values", "quantize_seconds"],
    "size": ["codec", "lzma_bytes", "zstd_bytes", "model_bytes", "code_bytes", "total_bytes", "cap_bytes", "under_cap"],
    "eval": ["val_loss", "val_bpb", "stride", "context", "scored_tokens", "scored_bytes", "eval_seconds"],
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh git+DVC repo holding the tracked files of this checkout, at the micro config."""
    return micro_repo(tmp_path_factory.mktemp("pipeline") / "repo")


def test_repro_writes_every_contract_metric(repo):
    for name, keys in CONTRACT.items():
        data = json.loads((repo / "metrics" / f"{name}.json").read_text())
        missing = [k for k in keys if k not in data]
        assert not missing, f"metrics/{name}.json lacks {missing}"
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0 < ev["val_bpb"] < 10
    assert "Data and pipelines are up to date" in _dvc("repro", cwd=repo)


def test_quantize_param_reruns_only_downstream_and_run_cache_restores(repo):
    before = json.loads((repo / "metrics" / "size.json").read_text())
    out = _dvc("exp", "run", "-S", "quantize.damp=0.05", cwd=repo)
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Stage 'train' didn't change, skipping" in out
    assert "Running stage 'quantize'" in out and "Running stage 'evaluate'" in out
    out = _dvc("exp", "run", "-S", "quantize.damp=0.01", cwd=repo)
    assert "Stage 'quantize' is cached - skipping run" in out
    assert "Running stage" not in out
    assert json.loads((repo / "metrics" / "size.json").read_text()) == before
    _run(["git", "checkout", "-q", "--", "."], repo)
    _dvc("checkout", "-q", cwd=repo)


def test_metrics_params_plots_diff_between_branches(repo):
    _run(["git", "checkout", "-q", "-b", "int5"], repo)
    _set_params(repo, {"quantize": {"bits": 5}})
    out = _dvc("repro", cwd=repo)
    assert "Stage 'train' didn't change, skipping" in out
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "int5"], repo)

    diff = json.loads(_dvc("metrics", "diff", "main", "int5", "--json", cwd=repo))
    size, ev = diff["metrics/size.json"], diff["metrics/eval.json"]
    assert size["model_bytes"]["new"] < size["model_bytes"]["old"]
    assert size["model_bytes"]["diff"] < 0
    assert ev["val_bpb"]["old"] is not None and ev["val_bpb"]["new"] is not None
    assert "metrics/train.json" not in diff  # train did not rerun: same numbers on both branches

    params = json.loads(_dvc("params", "diff", "main", "int5", "--json", cwd=repo))
    changed = params["params.yaml"]["quantize.bits"]
    assert (changed["old"], changed["new"]) == (6, 5)  # DVC >= 3.6x also reports "diff": -1
    assert list(params["params.yaml"]) == ["quantize.bits"]  # nothing else changed

    plots = json.loads(_dvc("plots", "diff", "main", "int5", "--json", cwd=repo))
    charts = plots["data"]
    assert {"train_loss", "lr_scale", "tokens_per_second"} <= set(charts)
    loss = charts["train_loss"][0]
    assert loss["revisions"] == ["main", "int5"]
    rows = loss["content"]["data"]["values"]
    assert {r["rev"] for r in rows} == {"main", "int5"} and all("train_loss" in r for r in rows)
    _run(["git", "checkout", "-q", "main"], repo)
    _dvc("checkout", "-q", cwd=repo)
