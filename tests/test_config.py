"""params.yaml <-> pgolf/config.py: every field set in params.yaml, types and ranges checked where a
section is loaded, lists as YAML lists, profiles as their differences from the record defaults."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf import config
from pgolf.params import profiles

ROOT = Path(__file__).resolve().parents[1]


def test_config_imports_neither_torch_nor_any_other_pgolf_module():
    code = ("import sys; import pgolf.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('pgolf')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pgolf', 'pgolf.config']"


def test_params_yaml_is_the_tiny_profile_written_out():
    """The committed params.yaml sets every field of every section, and is what `pgolf profiles
    tiny` writes (a new knob's key reaches it by rerunning that command)."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, cls in config.SECTIONS.items():
        assert list(doc[section]) == [f.name for f in dataclasses.fields(cls)], section
    assert (ROOT / "params.yaml").read_text() == profiles.render("tiny", profiles.resolve("tiny", ROOT))


@pytest.mark.parametrize("name", profiles.available(ROOT))
def test_committed_profiles_hold_only_their_differences(name):
    diff = profiles.differences(name, ROOT)
    same = [f"{s}.{k}" for s, kv in diff.items() for k, v in kv.items() if config.to_dict(config.SECTIONS[s]())[k] == v]
    assert not same, f"profiles/{name}.yaml repeats the record defaults {same}"
    assert set(profiles.load(name, ROOT)) == set(config.SECTIONS)


def test_the_record_profile_is_the_dataclass_defaults():
    """No third, silent profile: a key left out of a partial dict takes the record recipe's value."""
    assert profiles.differences("record", ROOT) == {}
    assert profiles.load("record", ROOT) == {s: cls() for s, cls in config.SECTIONS.items()}


@pytest.mark.parametrize("section,values,message", [
    ("prepare", {"workers": 0}, "prepare.workers must be >= 1, got 0"),
    ("model", {"num_kv_heads": 3}, "model.num_kv_heads must divide model.num_heads (4), got 3"),
    ("train", {"ema_decay": 1.0}, "train.ema_decay must be in [0, 1), got 1.0"),
    ("train", {"hessian_source": "calibration"}, "train.hessian_source calibration needs train.calibration_batches > 0"),
    ("train", {"hessian_source": "both"}, "train.hessian_source must be one of"),
    ("train", {"calibration_batches": -1}, "train.calibration_batches must be >= 0, got -1"),
    ("train", {"calibration_seqs": 0}, "train.calibration_seqs must be >= 1, got 0"),
    ("train", {"batch_tokens": 8000}, "train.batch_tokens must be divisible by world_size * micro-batches * "
                                      "sequence length = 1 * 1 * 256 = 256, got 8000"),
    ("quantize", {"bits": 9}, "quantize.bits must be in the supported range [2, 8], got 9"),
    ("compress", {"zstd_level": 23}, "compress.zstd_level must be in [1, 22], got 23"),
    ("compress", {"target_bytes": 16_000_001}, "compress.target_bytes must be <= compress.cap_bytes (16000000)"),
    ("evaluate", {"ttt_epochs": 0}, "evaluate.ttt_epochs must be >= 1, got 0"),
    ("evaluate", {"max_tokens": 100}, "evaluate.max_tokens must be 0 (all) or >= evaluate.context (256), one window"),
])
def test_every_section_is_range_checked_where_it_is_loaded(tmp_path, section, values, message):
    doc = config.read_doc(ROOT / "params.yaml")
    doc[section].update(values)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(config.ConfigError) as e:
        config.load(section, tmp_path / "p.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'p.yaml'}: {message}")
    tiny = config.load(section, ROOT / "params.yaml")
    with pytest.raises(config.ConfigError, match="^params.yaml: "):
        config.check(dataclasses.replace(tiny, **values))


def test_the_rules_across_sections_run_with_the_whole_file():
    doc = config.read_doc(ROOT / "params.yaml")
    doc["evaluate"].update(ttt_enabled=True, ttt_first_layer=4)
    with pytest.raises(config.ConfigError, match=r"^p.yaml: evaluate.ttt_first_layer must be < model.num_layers \(4\)"):
        config.load_all(doc, "p.yaml")
    doc["evaluate"]["ttt_first_layer"] = 3
    assert config.load_all(doc, "p.yaml")["evaluate"].ttt_first_layer == 3


def test_fa4_dense_attention_refuses_fa3_document_attention():
    """Both swap aten's flash kernels for the whole process, so they cannot run in one."""
    doc = config.read_doc(ROOT / "params.yaml")
    doc["model"]["attn_backend"] = "fa4"
    doc["train"].update(doc_packing=True, doc_attn_backend="fa3")
    with pytest.raises(config.ConfigError, match=r"^p.yaml: train.doc_attn_backend .*fa3 cannot run beside model.attn_backend fa4"):
        config.load_all(doc, "p.yaml")
    doc["train"]["doc_attn_backend"] = "fa4"
    assert config.load_all(doc, "p.yaml")["model"].attn_backend == "fa4"


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


def test_lists_are_yaml_lists():
    q = config.from_dict("quantize", {"clip_quantiles": [0.999, 1]})
    assert q.clip_quantiles == (0.999, 1.0)
    t = config.from_dict("train", {"seq_len_schedule": [[1024, 0.3], [1536, 0.6]]})
    assert t.seq_len_schedule == ((1024, 0.3), (1536, 0.6)) and t.seq_lens() == [1024, 1536, 2048]
    e = config.from_dict("evaluate", {"ttt_targets": ["mlp.fc", "attn.c_q"]})
    assert e.ttt_targets == ("mlp.fc", "attn.c_q")
    for section, key, value, why in [
            ("quantize", "clip_quantiles", "0.999,1.0", "must be a list of float, got str"),
            ("quantize", "clip_quantiles", [0.9, 0.9], "must be a list of distinct numbers in (0, 1]"),
            ("train", "seq_len_schedule", "1024@0.3", "must be a list of [int, float], got str"),
            ("train", "seq_len_schedule", [[1024]], "must be a list of [int, float], got list"),
            ("train", "seq_len_schedule", [[1024, 0.6], [512, 0.3]], "fractions must increase within (0, 1]"),
            ("evaluate", "ttt_targets", ["mlp.fc", "mlp.up"], "must list distinct names among attn.c_q")]:
        with pytest.raises(config.ConfigError, match=rf"{section}\.{key} {__import__('re').escape(why)}"):
            config.from_dict(section, {key: value})


def test_the_checked_values_survive_json_and_restore():
    for section, cls in config.SECTIONS.items():
        cfg = profiles.load("tiny", ROOT)[section]
        assert config.restore(section, json.loads(json.dumps(config.to_dict(cfg))), "f.json") == cfg


@pytest.mark.parametrize("world,accum,micro", [(1, 8, 98304), (2, 4, 98304), (8, 1, 98304), (16, 1, 49152)])
def test_the_batch_split_of_the_record(world, accum, micro):
    """train.grad_accum_steps 0: the fewest micro-batches of <= 48 sequences per rank (the records' 8 // world)."""
    split = config.TrainConfig().batch_split(world)
    assert (split.accum, split.micro_tokens) == (accum, micro)


def test_the_batch_split_of_a_quarter_batch_and_explicit_steps():
    quarter = config.TrainConfig(batch_tokens=196_608)
    assert [quarter.batch_split(w).accum for w in (1, 2, 8)] == [2, 1, 1]  # not 8 micro-batches of 12
    assert dataclasses.replace(quarter, max_micro_batch_seqs=40).batch_split(1).accum == 3  # 3 of 32
    assert dataclasses.replace(quarter, max_micro_batch_seqs=1).batch_split(1).accum == 96
    assert dataclasses.replace(quarter, grad_accum_steps=8).batch_split(1).accum == 8  # explicit wins
    with pytest.raises(config.ConfigError, match=r"train.batch_tokens must be divisible .* = 5 \* 1 \* 2048"):
        config.TrainConfig().batch_split(5)
    with pytest.raises(config.ConfigError, match=r"= 1 \* 1 \* 48 = 48"):  # every length of the schedule
        config.from_dict("train", {"batch_tokens": 2048, "seq_len": 128, "grad_accum_steps": 1, "nproc_per_node": 1,
                                   "seq_len_schedule": [[48, 0.5]]})


def test_profile_apply_round_trip(tmp_path):
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    changes = profiles.apply("record", tmp_path)
    assert any(c.startswith("model.num_layers: 4 -> 11") for c in changes)
    assert config.load("train", tmp_path / "params.yaml").batch_tokens == 786432
    assert profiles.apply("tiny", tmp_path)  # back again
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    with pytest.raises(config.ConfigError, match="no such profile"):
        profiles.apply("nope", tmp_path)


def test_profile_set_writes_values_over_the_profile_and_refuses_bad_ones_untouched(tmp_path, capsys, monkeypatch):
    """`pgolf profiles record --set ...`: the values land in params.yaml (checked with the rest);
    an unknown key, a malformed item or a value its check refuses leaves params.yaml as it was."""
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    changes = profiles.apply("record", tmp_path, ["train.nproc_per_node=1", "evaluate.stride=16"])
    assert any(c.startswith("evaluate.stride: ") and c.endswith(" -> 16") for c in changes)
    assert config.load("train", tmp_path / "params.yaml").nproc_per_node == 1
    assert config.load("evaluate", tmp_path / "params.yaml").stride == 16
    before = (tmp_path / "params.yaml").read_text()
    for sets, message in ((["train.nproc_per_nod=1"], r"--set: 'train.nproc_per_nod' is not a key of .*tiny.yaml"),
                          (["train=1"], r"--set 'train=1': want section.key=value"),
                          (["train.nproc_per_node=0"], r"tiny.yaml with --set: train.nproc_per_node must be >= 1")):
        with pytest.raises(config.ConfigError, match=message):
            profiles.apply("tiny", tmp_path, sets)
        assert (tmp_path / "params.yaml").read_text() == before
    monkeypatch.chdir(tmp_path)
    assert profiles.main(["tiny", "--set", "train.iterations=7"]) == 0
    assert "with 1 --set" in capsys.readouterr().out
    assert config.load("train", tmp_path / "params.yaml").iterations == 7


def test_params_yaml_carries_each_fields_comment():
    text = (ROOT / "params.yaml").read_text()
    assert text.startswith("# Written by `pgolf profiles tiny`")
    assert "  codec: auto" in text and "# auto (smallest) | lzma | zstd | brotli" in text
    comments = profiles.field_comments()
    assert comments[("train", "seq_len_schedule")].startswith("[[LEN, FRAC], ...]")
    assert len(comments) > 90


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
    with pytest.raises(config.ConfigError, match=r"params.yaml: (not valid YAML|must be a mapping|section 'train' is missing)"):
        config.load("train", tmp_path / "params.yaml")


def _stage(stage: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_the_gate_reports_invalid_yaml_without_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("quantize:\n  bits: 6\n  damp: [0.01\n")
    p = _stage("params", tmp_path)
    assert p.returncode == 1 and p.stderr.startswith("params: error: params.yaml: not valid YAML at line"), p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("stage", ["prepare", "train", "quantize", "compress", "evaluate", "data_check"])
def test_stages_read_the_gates_files_and_refuse_stale_ones(tmp_path, stage):
    """A stage reads artifacts/params/<section>.json: missing (the gate never ran) or older than
    params.yaml (edited since) is a one-line error naming the file, never a silent old value."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    p = _stage(stage, tmp_path)
    assert p.returncode == 1 and "no checked values of section" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert _stage("params", tmp_path).returncode == 0
    doc = yaml.safe_load((tmp_path / "params.yaml").read_text())
    for section, (key, value) in {"prepare": ("workers", 1), "model": ("qk_gain_init", 2.0), "train": ("seed", 7),
                                  "quantize": ("damp", 0.02), "compress": ("zstd_level", 19),
                                  "evaluate": ("batch_seqs", 8)}.items():
        doc[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    p = _stage(stage, tmp_path)
    assert p.returncode == 1 and "older than the" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_profile_with_a_typo_blames_the_profile(tmp_path):
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    bad = tmp_path / "profiles" / "typo.yaml"
    bad.write_text((ROOT / "profiles" / "tiny.yaml").read_text().replace("  iterations: 150", "  iterationz: 150"))
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: unknown key\(s\) train\.iterationz") as e:
        profiles.apply("typo", tmp_path)
    assert "params.yaml" not in str(e.value)
    bad.write_text((ROOT / "profiles" / "tiny.yaml").read_text().replace("  iterations: 150", "  iterations: many"))
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: train\.iterations must be int"):
        profiles.apply("typo", tmp_path)
    bad.write_text("trian:\n  seed: 1\n")
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: unknown section\(s\) trian"):
        profiles.apply("typo", tmp_path)
    bad.write_text("train: 5\n")
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: section\(s\) train must be a mapping"):
        profiles.apply("typo", tmp_path)
    bad.write_text("train: {\n")
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: not valid YAML"):
        profiles.apply("typo", tmp_path)
    bad.write_text("compress:\n  target_bytes: 17000000\n")  # fine alone, wrong with the defaults around it
    with pytest.raises(config.ConfigError, match=r"profiles/typo.yaml: compress.target_bytes must be <= compress.cap"):
        profiles.apply("typo", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()  # untouched


def test_frontier_is_the_record_profile_plus_three_knobs_and_says_it_is_not_shown_better():
    """Only the three knob keys differ (a frontier that also changed, say, the lr would not be the
    record + knobs that its header says), and its header does not claim what 180 s runs did not
    show: it says NOT SHOWN BETTER, names both seeds' 180 s figures and the protocol."""
    diff = profiles.differences("frontier", ROOT)
    assert {f"{s}.{k}" for s, kv in diff.items() for k in kv} == {
        "model.smear_bos_mask", "model.logit_softcap_neg", "train.muon_ns_coeffs"}
    header = (ROOT / "profiles" / "frontier.yaml").read_text().split("model:")[0]
    assert "NOT SHOWN BETTER" in header and "measured better" not in header
    assert all(f in header for f in ("180 s", "1.6465", "1.6448", "1.6426", "1.6491", ">= 2 seeds"))
