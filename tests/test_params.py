"""The params gate (pgolf.params.params, stage `params`): every section of params.yaml is type- and
range-checked by the stages' own checks before DVC runs any stage; one validated file per section.
The gate's purpose, a bad value never costs the outputs of its stage under `dvc repro`, is
tested end to end in test_pipeline_dvc.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import params_yaml
from pgolf import config
from pgolf.params import params

ROOT = Path(__file__).resolve().parents[1]
BAD = {
    "prepare": ({"source": "web"}, "prepare.source must be one of embedded, local, fineweb"),
    "model": ({"num_heads": 3}, "model.num_heads (3) must divide model.model_dim (128)"),
    "train": ({"matrix_lr": -1.0}, "train.matrix_lr must be >= 0"),
    "quantize": ({"bits": 9}, "quantize.bits must be in the supported range [2, 8]"),
    "compress": ({"zstd_level": 30}, "compress.zstd_level must be in [1, 22]"),
    "evaluate": ({"stride": 999}, "evaluate.stride must be in [0, evaluate.context=256]"),
}


def test_writes_one_validated_file_per_section(tmp_path):
    (tmp_path / "params.yaml").write_text(params_yaml())
    params.run(tmp_path / "params.yaml", tmp_path / "out")
    assert sorted(p.stem for p in (tmp_path / "out").iterdir()) == sorted(config.SECTIONS)
    doc = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    assert json.loads((tmp_path / "out" / "quantize.json").read_text()) == doc["quantize"]


def test_a_section_file_changes_only_with_its_section(tmp_path):
    (tmp_path / "params.yaml").write_text(params_yaml())
    params.run(tmp_path / "params.yaml", tmp_path / "a")
    (tmp_path / "params.yaml").write_text(params_yaml(quantize={"bits": 5}))
    params.run(tmp_path / "params.yaml", tmp_path / "b")
    changed = [s for s in config.SECTIONS
               if (tmp_path / "a" / f"{s}.json").read_bytes() != (tmp_path / "b" / f"{s}.json").read_bytes()]
    assert changed == ["quantize"]


@pytest.mark.parametrize("section", list(BAD))
def test_each_stages_range_check_runs_in_the_gate(tmp_path, section):
    values, message = BAD[section]
    (tmp_path / "params.yaml").write_text(params_yaml(**{section: values}))
    with pytest.raises(config.ConfigError) as e:
        params.run(tmp_path / "params.yaml", tmp_path / "out")
    assert str(e.value).startswith(f"{tmp_path / 'params.yaml'}: ") and message in str(e.value)  # names the file
    assert not (tmp_path / "out").exists()  # nothing written for a bad params file


def test_stage_cli(tmp_path):
    def run():
        return subprocess.run([sys.executable, "-m", "stages.params"], cwd=tmp_path, capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    (tmp_path / "params.yaml").write_text(params_yaml(quantize={"bits": 9}))
    p = run()
    assert p.returncode == 1 and p.stderr.startswith("params: error: params.yaml: quantize.bits"), p.stderr
    assert "Traceback" not in p.stderr
    (tmp_path / "params.yaml").write_text(params_yaml())
    p = run()
    assert p.returncode == 0, p.stderr
    assert "params: 6 sections of params.yaml checked" in p.stdout
    assert (tmp_path / "artifacts/params/evaluate.json").is_file()
