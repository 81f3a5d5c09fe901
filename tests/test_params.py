"""The two gates: `params` (pgolf.params.params) checks all of params.yaml and writes one file of
checked values per section, which the stages read (pgolf.shared.checked); `data_check`
(pgolf.params.data_check) checks those values against the prepared data's metadata. That a bad
value never costs the outputs of its stage under `dvc repro` is tested end to end in
test_pipeline_dvc.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import params_yaml
from pgolf import config
from pgolf.params import data_check, params
from pgolf.shared import checked, layout

ROOT = Path(__file__).resolve().parents[1]
BAD = {
    "prepare": ({"source": "web"}, "prepare.source must be one of embedded, local, fineweb"),
    "model": ({"num_heads": 3}, "model.num_heads must divide model.model_dim (128), got 3"),
    "train": ({"matrix_lr": -1.0}, "train.matrix_lr must be >= 0"),
    "quantize": ({"bits": 9}, "quantize.bits must be in the supported range [2, 8]"),
    "compress": ({"zstd_level": 30}, "compress.zstd_level must be in [1, 22]"),
    "evaluate": ({"stride": 999}, "evaluate.stride must be in [0, evaluate.context=256]"),
}


def test_writes_one_file_of_checked_values_per_section_and_the_stages_read_them(tmp_path):
    (tmp_path / "params.yaml").write_text(params_yaml(quantize={"clip_quantiles": [0.999, 1.0]}))
    cfgs = params.run(tmp_path / "params.yaml", tmp_path)
    assert sorted(p.stem for p in (tmp_path / layout.PARAMS).iterdir()) == sorted(config.SECTIONS)
    assert json.loads((tmp_path / layout.params_file("quantize")).read_text())["clip_quantiles"] == [0.999, 1.0]
    for section in config.SECTIONS:
        assert checked.read(section, tmp_path) == cfgs[section]
    assert checked.read("quantize", tmp_path).clip_quantiles == (0.999, 1.0)


def test_a_section_file_changes_only_with_its_section(tmp_path):
    (tmp_path / "params.yaml").write_text(params_yaml())
    params.run(tmp_path / "params.yaml", tmp_path / "a")
    (tmp_path / "params.yaml").write_text(params_yaml(quantize={"bits": 5}))
    params.run(tmp_path / "params.yaml", tmp_path / "b")
    changed = [s for s in config.SECTIONS
               if (tmp_path / "a" / layout.params_file(s)).read_bytes() != (tmp_path / "b" / layout.params_file(s)).read_bytes()]
    assert changed == ["quantize"]


@pytest.mark.parametrize("section", list(BAD))
def test_each_sections_range_checks_run_in_the_gate(tmp_path, section):
    values, message = BAD[section]
    (tmp_path / "params.yaml").write_text(params_yaml(**{section: values}))
    with pytest.raises(config.ConfigError) as e:
        params.run(tmp_path / "params.yaml", tmp_path / "out")
    assert str(e.value).startswith(f"{tmp_path / 'params.yaml'}: ") and message in str(e.value)  # names the file
    assert not (tmp_path / "out").exists()  # nothing written for a bad params file


def test_cuda_asked_on_a_machine_without_it_is_refused_by_the_gate(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "params.yaml").write_text(params_yaml(train={"device": "cuda"}, quantize={"device": "cuda"}))
    with pytest.raises(config.ConfigError, match=r"params.yaml: train.device, quantize.device is cuda but CUDA is not"):
        params.run(tmp_path / "params.yaml", tmp_path)


def test_the_gate_imports_no_torch_unless_a_device_asks_for_cuda(tmp_path):
    (tmp_path / "params.yaml").write_text(params_yaml())
    code = ("import sys; from pgolf.params import params; params.run('params.yaml'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr


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


# ----------------------------------------------------------------------------- data_check


FACTS = {"vocab_size": 1024, "tokenizer_sha256": "ab" * 32, "train_tokens": 100_000, "val_tokens": 5_000}


def _prepared(root: Path, facts: dict = FACTS, **sections) -> None:
    """A folder as the params gate and prepare leave it: params.yaml, its checked files, the data's metadata."""
    (root / "params.yaml").write_text(params_yaml(**sections))
    params.run(root / "params.yaml", root)
    tok = root / layout.TOKENIZER
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "tokenizer.json").write_text(json.dumps({"model_file": "tokenizer.model", "vocab_size": facts["vocab_size"],
                                                    "sha256": facts["tokenizer_sha256"], "source": "test"}))
    (root / layout.METRICS).mkdir(exist_ok=True)
    (root / layout.PREPARE_METRICS).write_text(json.dumps(
        {"vocab_size": facts["vocab_size"], "train_tokens": facts["train_tokens"], "val_tokens": facts["val_tokens"]}))


def test_data_check_writes_the_facts_it_checked_against(tmp_path):
    _prepared(tmp_path)
    assert data_check.run(tmp_path) == FACTS
    assert json.loads((tmp_path / layout.DATA_CHECK).read_text()) == FACTS


@pytest.mark.parametrize("sections,facts,message", [
    ({"model": {"vocab_size": 512}}, {}, r"model.vocab_size is 512 but .*data/tokenizer/tokenizer.json says the "
                                         r"tokenizer has 1024 tokens; set model.vocab_size to 1024"),
    ({"train": {"batch_tokens": 131072}}, {}, r"train.batch_tokens \(131072\) must be below the 100,000 training "
                                               r"tokens of .*metrics/prepare.json"),
    ({"train": {"val_tokens": 0}}, {"val_tokens": 200}, r"train.seq_len \(256\) needs 257 validation tokens"),
    ({"evaluate": {"max_tokens": 0}, "train": {"seq_len": 128}}, {"val_tokens": 250}, r"evaluate.context \(256\) is longer than the 249 "
                                                           r"validation targets"),
])
def test_data_check_names_the_key_and_the_data_file(tmp_path, sections, facts, message):
    _prepared(tmp_path, {**FACTS, **facts}, **sections)
    with pytest.raises(config.ConfigError, match=rf"^params.yaml: {message}"):
        data_check.run(tmp_path)
    assert not (tmp_path / layout.DATA_CHECK).exists()


def test_data_check_without_the_prepared_data_says_to_run_prepare(tmp_path):
    (tmp_path / "params.yaml").write_text(params_yaml())
    params.run(tmp_path / "params.yaml", tmp_path)
    with pytest.raises(config.ConfigError, match="run the prepare stage first"):
        data_check.run(tmp_path)


def test_data_check_stage_cli(tmp_path):
    _prepared(tmp_path, model={"vocab_size": 512})
    p = subprocess.run([sys.executable, "-m", "stages.data_check"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 1 and p.stderr.startswith("data_check: error: params.yaml: model.vocab_size is 512"), p.stderr
    assert "Traceback" not in p.stderr
    doc = yaml.safe_load((tmp_path / "params.yaml").read_text())
    doc["model"]["vocab_size"] = 1024
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    params.run(tmp_path / "params.yaml", tmp_path)
    p = subprocess.run([sys.executable, "-m", "stages.data_check"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and "data_check: params fit the data" in p.stdout, p.stderr
