"""params.yaml <-> pgolf/config.py: every field is set explicitly, types are checked."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pgolf import config

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_sets_every_field_of_every_section():
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, cls in config.SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(doc[section]) == fields, f"params.yaml [{section}] must set exactly the fields of {cls.__name__}"
        config.load(section, ROOT / "params.yaml")


@pytest.mark.parametrize("name", ["record", "frontier"])
def test_record_profile_sets_every_field_too(name):
    doc = yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text())
    for section, cls in config.SECTIONS.items():
        assert set(doc[section]) == {f.name for f in dataclasses.fields(cls)}
        config.from_dict(section, doc[section])


def test_dataclass_defaults_are_the_record_profile():
    """No third, silent profile: a key left out of a partial dict takes the record recipe's value."""
    doc = config.read_doc(ROOT / "profiles" / "record.yaml")
    for section, cls in config.SECTIONS.items():
        assert cls() == config.from_doc(doc, section), f"pgolf/config.py {cls.__name__} defaults != profiles/record.yaml"


@pytest.mark.parametrize("section,values,message", [
    ("prepare", {"workers": 0}, "prepare.workers must be >= 1, got 0"),
    ("model", {"num_kv_heads": 3}, "model.num_kv_heads (3) must divide model.num_heads"),
    ("train", {"ema_decay": 1.0}, "train.ema_decay must be in [0, 1), got 1.0"),
    ("quantize", {"bits": 9}, "quantize.bits must be in the supported range [2, 8], got 9"),
    ("compress", {"zstd_level": 23}, "compress.zstd_level must be in [1, 22], got 23"),
    ("evaluate", {"ttt_epochs": 0}, "evaluate.ttt_epochs must be >= 1, got 0"),
])
def test_every_section_is_range_checked_where_it_is_loaded(tmp_path, section, values, message):
    doc = config.read_doc(ROOT / "profiles" / "tiny.yaml")
    doc[section].update(values)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(config.ConfigError) as e:
        config.load(section, tmp_path / "p.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'p.yaml'}: {message}")
    with pytest.raises(config.ConfigError, match="^params.yaml: "):
        config.check(config.SECTIONS[section](**values))


def test_wrong_type_names_the_parameter():
    with pytest.raises(config.ConfigError, match=r"prepare\.vocab_size must be int"):
        config.from_dict("prepare", {"vocab_size": "big"})
    with pytest.raises(config.ConfigError, match=r"train\.compile must be bool"):
        config.from_dict("train", {"compile": 1})


def test_unknown_key_is_named():
    with pytest.raises(config.ConfigError, match=r"quantize\.bitz"):
        config.from_dict("quantize", {"bitz": 6})


def test_floats_accept_ints_and_yaml_exponent_strings():
    cfg = config.from_dict("train", {"adam_eps": "1e-8", "matrix_lr": 1})
    assert cfg.adam_eps == 1e-8 and cfg.matrix_lr == 1.0


def test_params_yaml_is_the_tiny_profile():
    assert (ROOT / "params.yaml").read_text() == (ROOT / "profiles" / "tiny.yaml").read_text()


def test_profile_apply_round_trip(tmp_path):
    import shutil

    from pgolf.params import profiles

    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    changes = profiles.apply("record", tmp_path)
    assert any(c.startswith("model.num_layers: 4 -> 11") for c in changes)
    assert config.load("train", tmp_path / "params.yaml").batch_tokens == 786432
    assert profiles.apply("tiny", tmp_path)  # back again
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "profiles" / "tiny.yaml").read_text()
    with pytest.raises(config.ConfigError, match="no such profile"):
        profiles.apply("nope", tmp_path)


# ----------------------------------------------------------------------------- issue 17: 5, 6, 11


def test_missing_section_is_an_error_naming_it(tmp_path):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    del doc["train"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(config.ConfigError, match=r"params.yaml: section 'train' is missing"):
        config.load("train", tmp_path / "params.yaml")
    doc["train"] = None  # `train:` with nothing under it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(config.ConfigError, match=r"missing key\(s\) train\.seed, train\.device"):
        config.load("train", tmp_path / "params.yaml")


def test_missing_key_is_an_error_naming_it(tmp_path):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    del doc["train"]["batch_tokens"], doc["train"]["iterations"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(config.ConfigError, match=r"params.yaml: missing key\(s\) train\.batch_tokens, train\.iterations"):
        config.load("train", tmp_path / "params.yaml")
    assert config.load("model", tmp_path / "params.yaml").num_layers == 4  # other sections still load


@pytest.mark.parametrize("text", ["train: [unclosed\n", "train:\n  seed: 1\n bad-indent: 2\n", "- a\n- b\n", "42\n", ""])
def test_not_yaml_or_not_a_mapping_is_an_error_naming_the_file(tmp_path, text):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(config.ConfigError, match=r"params.yaml: (not valid YAML|must be a mapping)"):
        config.load("train", tmp_path / "params.yaml")


@pytest.mark.parametrize("stage", ["prepare", "train", "quantize", "compress", "evaluate", "params"])
def test_stages_report_invalid_yaml_without_traceback(tmp_path, stage):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("quantize:\n  bits: 6\n  damp: [0.01\n")
    p = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"{stage}: error: params.yaml: not valid YAML at line"), p.stderr
    assert "Traceback" not in p.stderr


def test_profile_with_a_typo_blames_the_profile(tmp_path):
    from pgolf.params import profiles

    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    bad = tmp_path / "profiles" / "typo.yaml"
    bad.write_text((ROOT / "profiles" / "tiny.yaml").read_text().replace("  bits: 6", "  bitz: 6"))
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: unknown key\(s\) quantize\.bitz") as e:
        profiles.apply("typo", tmp_path)
    assert "params.yaml" not in str(e.value)
    bad.write_text((ROOT / "profiles" / "tiny.yaml").read_text().replace("  iterations: 150", "  iterations: many"))
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: train\.iterations must be int"):
        profiles.apply("typo", tmp_path)
    bad.write_text("train: {\n")
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: not valid YAML"):
        profiles.apply("typo", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()  # untouched


def test_frontier_is_the_record_profile_plus_the_knobs_that_measured_better():
    """Only the knob keys that measured better in the ablation differ (a frontier that also
    changed, say, the lr would not be the record + knobs that its header says), and its header
    names the equal-step comparison whose frontier row beats its record row."""
    rec = yaml.safe_load((ROOT / "profiles" / "record.yaml").read_text())
    text = (ROOT / "profiles" / "frontier.yaml").read_text()
    front = yaml.safe_load(text)
    diff = {f"{s}.{k}" for s in rec for k in rec[s] if rec[s][k] != front[s][k]}
    assert diff == {"model.smear_bos_mask", "model.logit_softcap_neg", "train.muon_ns_coeffs"}
    header = text.split("prepare:")[0]
    result = "ablation_model_h200_machine4_accum2.json"
    assert f"bench/results/{result}" in header
    rows = {r["name"]: r for r in json.loads((ROOT / "bench" / "results" / result).read_text())["rows"]}
    assert rows["frontier"]["eval.val_bpb"] < rows["record"]["eval.val_bpb"]
    assert abs(rows["frontier"]["train.steps"] - rows["record"]["train.steps"]) <= 1  # equal steps, not luck
