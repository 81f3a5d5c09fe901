"""bench/overrides.py: how every bench finds its params. A profile given by name or by file holds only
its differences from the record defaults and is resolved to every key before `section.key=value`
overrides apply; a complete params file is taken as it is; errors name the profile."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import overrides  # noqa: E402
from pgolf import config  # noqa: E402
from pgolf.params import profiles  # noqa: E402


def test_a_profile_by_name_or_by_file_resolves_to_the_same_complete_document(tmp_path, monkeypatch):
    name, doc = overrides.resolve("tiny")
    assert name == "profiles/tiny.yaml" and doc == profiles.resolve("tiny", ROOT)
    assert set(doc) == set(config.SECTIONS) and doc["quantize"]["damp"] == config.QuantizeConfig().damp  # a default
    monkeypatch.chdir(tmp_path)  # a file is found wherever the caller stands
    assert overrides.resolve(ROOT / "profiles" / "tiny.yaml") == (name, doc)
    assert overrides.resolve("record")[1] == {s: config.to_dict(cls()) for s, cls in config.SECTIONS.items()}


def test_a_profile_file_outside_the_checkout_and_a_complete_params_file(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.yaml").write_text("model: {num_layers: 3, xsa_last_n: 3}\n")
    name, doc = overrides.resolve(tmp_path / "profiles" / "mine.yaml")
    assert name == str(tmp_path / "profiles" / "mine.yaml") and doc["model"]["num_layers"] == 3
    assert doc["train"] == config.to_dict(config.TrainConfig())
    params = tmp_path / "params.yaml"  # every key, as `pgolf profiles tiny` writes it
    params.write_text(profiles.render("tiny", profiles.resolve("tiny", ROOT)))
    assert overrides.load(params) == overrides.load("tiny")
    params.write_text("model: {num_layers: 3}\n")  # not a profile: every key is required
    with pytest.raises(config.ConfigError, match=r"params.yaml: section 'prepare' is missing"):
        overrides.load(params)


def test_load_applies_overrides_then_checks_every_value():
    cfgs = overrides.load("tiny", {"train.iterations": 5, "train.seq_len_schedule": [[128, 0.5]]})
    assert cfgs["train"].iterations == 5 and cfgs["train"].seq_len_schedule == ((128, 0.5),)
    assert cfgs["model"] == profiles.load("tiny", ROOT)["model"]
    with pytest.raises(ValueError, match=r"--set: 'model.nope' is not a key of profiles/tiny.yaml"):
        overrides.load("tiny", {"model.nope": 1})
    with pytest.raises(config.ConfigError, match=r"profiles/tiny.yaml with --x: quantize.damp must be positive"):
        overrides.load("tiny", {"quantize.damp": -1.0}, "--x")
    with pytest.raises(config.ConfigError, match=r"profiles/nope.yaml: no such profile"):
        overrides.load("nope")
