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

from _dvc_repo import SHRINK, copy_checkout
from pgolf.params import profiles

ROOT = Path(__file__).resolve().parents[1]
STAGES = [s["cmd"].split()[-1] for s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()]
DATA = ("source", "corpus", "val_source", "fineweb_train_shards", "workers")  # tiny's: the embedded corpus


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
