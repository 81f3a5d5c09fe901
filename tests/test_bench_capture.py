"""The Hessian-capture benchmark (bench/bench_capture.py) on CPU, at the tiny profile (given by file
or by name; profiles hold only their differences from the record defaults): every timed call and
gram variant is reported (the GPU-only variant as unsupported), the gram totals count each
capture's calls, the profile lists ops, and bad arguments are named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_capture as B  # noqa: E402
from pgolf.params import profiles  # noqa: E402
from pgolf.shared.model import GPT  # noqa: E402

TINY = ROOT / "profiles" / "tiny.yaml"


def test_reports_every_call_and_gram_variant(tmp_path):
    out = tmp_path / "capture.json"
    B.main(["--profile", str(TINY), "--batch", "2x32", "--repeats", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["profile"] == "profiles/tiny.yaml"
    assert r["batch"] == [2, 32] and r["versions"]["torch"] and r["seconds"] > 0
    assert set(r["ms"]) == {"forward", "capture", "capture_hidden", "capture_gram_fp32"}
    assert all(v > 0 for v in r["ms"].values())
    mcfg = profiles.load("tiny", ROOT)["model"]
    widths = {str(w) for w in GPT(mcfg, train_seq_len=32).hessian_shapes().values()}
    assert set(r["grams_ms"]["fp32"]) == widths
    assert r["grams_ms"]["bf16_out_fp32"].startswith("unsupported here")  # torch.mm's out_dtype: CUDA only
    prof = r["profile_capture"]
    assert prof["kernels"] > 0 and prof["top"] and prof["top"][0]["calls"] >= 1


def test_the_profile_by_name_builds_the_profiles_model_and_a_missing_one_is_named():
    model, x, y = B.build("tiny", (2, 8), torch.device("cpu"))
    mcfg = profiles.load("tiny", ROOT)["model"]
    assert model.num_params() == GPT(mcfg, train_seq_len=8).num_params() and x.shape == y.shape == (2, 8)
    assert len(model.blocks) == mcfg.num_layers == 4  # tiny.yaml's value, over the record's 11
    with pytest.raises(ValueError, match="profiles/nope.yaml: no such profile"):
        B.build("nope", (2, 8), torch.device("cpu"))


def test_gram_calls_count_one_per_shared_input():
    """q/k/v read one input: one gram per layer for them, then proj, fc and the MLP's proj."""
    mcfg = profiles.load("tiny", ROOT)["model"]
    model = GPT(mcfg, train_seq_len=32)
    calls = B._gram_calls(model)
    L, d = mcfg.num_layers, mcfg.model_dim
    assert calls[d] == 3 * L and sum(calls.values()) == 4 * L


@pytest.mark.parametrize("argv, msg", [(["--batch", "4"], "--batch must be BxT"),
                                       (["--repeats", "0"], "--repeats must be >= 1")])
def test_bad_arguments_are_named(argv, msg, tmp_path):
    with pytest.raises(SystemExit, match=msg):
        B.main([*argv, "--out", str(tmp_path / "x.json")])
