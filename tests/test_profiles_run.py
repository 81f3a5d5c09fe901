"""Each anchor profile, shrunk to a micro model on the embedded corpus, runs every stage of the
pipeline on the CPU through the stage entry points, in dvc.yaml's order: its knobs together (CaseOps
data, document packing, loops, calibration Hessians, int7 embeddings, LQER, per-group compression,
phased TTT with the n-gram tilt for pr2135) end to end, not only one by one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _dvc_repo import copy_checkout
from pgolf.params import profiles

ROOT = Path(__file__).resolve().parents[1]
STAGES = [s["cmd"].split()[-1] for s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()]
DATA = ("source", "corpus", "val_source", "fineweb_train_shards", "workers")  # tiny's: the embedded corpus
SHRINK = {
    "prepare": {"max_train_docs": 60},
    "model": {"model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "rope_dims": 4, "bigram_dim": 8, "ve_dim": 8},
    "train": {"nproc_per_node": 1, "batch_tokens": 1024, "seq_len": 128, "grad_accum_steps": 1, "iterations": 6,
              "max_wallclock_seconds": 0.0, "warmdown_iters": 2, "warmup_steps": 0, "muon_momentum_warmup_steps": 2,
              "hessian_every": 2, "hessian_start_scale": 1.0, "val_tokens": 2048, "log_every": 2,
              "checkpoint_every": 0, "calibration_seqs": 4},
    "quantize": {"passthrough_max_numel": 1024},
    "compress": {"prune_slack_bytes": 0, "lzma_chunk_bytes": 0, "zstd_chunk_bytes": 0},
    "evaluate": {"context": 128, "max_tokens": 2048, "nproc_per_node": 1, "ttt_rank": 4},
}


def shrunk(name: str) -> dict:
    """The profile's complete params with the embedded corpus and the micro sizes of SHRINK."""
    doc, tiny = profiles.resolve(name, ROOT), profiles.resolve("tiny", ROOT)
    doc["prepare"].update({k: tiny["prepare"][k] for k in DATA})
    if not (ROOT / doc["prepare"]["tokenizer"]).is_file():  # the challenge export's copy: the vendored sp1024
        doc["prepare"]["tokenizer"] = tiny["prepare"]["tokenizer"]
    for section, kv in SHRINK.items():
        doc[section].update(kv)
    return doc


@pytest.mark.parametrize("name", ["record", "pr535", "pr2135"])
def test_each_anchor_profile_runs_every_stage_on_the_cpu(name, tmp_path):
    copy_checkout(tmp_path)
    (tmp_path / "metrics" / "eval.json").unlink()  # the committed figures: the run must write its own
    (tmp_path / "params.yaml").write_text(profiles.render(name, shrunk(name)))
    for stage in STAGES:
        p = subprocess.run([sys.executable, "-m", stage], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, f"{name}: {stage} failed:\n{(p.stdout + p.stderr)[-3000:]}"
    ev = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert math.isfinite(ev["val_bpb"]) and 0.5 < ev["val_bpb"] < 12, ev["val_bpb"]
    train = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert train["steps"] == 6
    if name == "pr2135":  # CaseOps: scored on the original bytes, the float score within documents
        assert train["val_byte_source"] == "sidecar"
        assert "phased" in json.dumps(ev) and ev["stride"] == 0  # evaluate.doc_attention: non-sliding only
