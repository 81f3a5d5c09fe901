"""The records-folder export on a fake finished run (tests/_fake_run.py): what it writes, and every
refusal (changed artifact / params / code, over the cap, failed rule, bad metrics, bad code list,
missing train log or seed log), each leaving no folder behind and nothing outside --out."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import json
import sys
from pathlib import Path

import pytest

from _fake_run import finished_run, update_metric
from pgolf import config
from pgolf.compress import pack
from pgolf.shared import checked
from pgolf.submit import export, summary

ROOT = Path(__file__).resolve().parents[1]
TINY = config.load_all(config.read_doc(ROOT / "params.yaml"))  # the checked sections of the committed params


@pytest.fixture
def run(tmp_path) -> Path:
    return finished_run(tmp_path / "run")


def _export(root: Path, out: Path, **kw) -> Path:
    return export.export(root, out, "My run", "Jane", "jdoe", "blurb", **kw)


def refused(root: Path, out: Path, match: str, **kw) -> None:
    """Export fails with `match`, leaves no out folder, no temp folder and no new parent folder."""
    before = sorted(p.name for p in out.parent.parent.iterdir()) if out.parent.parent.exists() else None
    with pytest.raises(export.ExportError, match=match):
        _export(root, out, **kw)
    assert not out.exists()
    after = sorted(p.name for p in out.parent.parent.iterdir()) if out.parent.parent.exists() else None
    assert after == before


def test_export_writes_a_records_folder(run, tmp_path):
    out = _export(run, tmp_path / "records" / "track" / "x")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["train_gpt.py", "requirements.txt", "README.md", "submission.json", "model.ptz",
                            "train.log", "params.yaml", "rules_check.txt", "rules_check.json",
                            *(f"metrics_{n}.json" for n in export.NEEDED)])
    script = (run / "artifacts/final/train_gpt.py").read_bytes()
    assert (out / "train_gpt.py").read_bytes() == script == pack.build_script(run, checked.read_all(pack.BAKED_SECTIONS, run))
    sub = json.loads((out / "submission.json").read_text())
    assert sub["val_bpb"] == 2.4 and sub["bytes_code"] == len(script)
    assert sub["bytes_total"] == sub["bytes_model"] + len(script)
    assert sub["artifact_sha256"] == json.loads((run / "metrics/eval.json").read_text())["artifact_sha256"]
    text = (out / "README.md").read_text()
    assert "val_bpb 2.40000" in text and "torchrun --standalone --nproc_per_node=8 train_gpt.py" in text
    assert "rules self-check: all 6 passed" in text and "12,345 tokens/s" in text
    assert (out / "requirements.txt").read_text() == pack.requirements(checked.read_all(pack.BAKED_SECTIONS, run))
    assert json.loads((out / "rules_check.json").read_text())["passed"] is True
    assert (out / "model.ptz").read_bytes() == (run / "artifacts/final/model.ptz").read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name != "x"]  # the temp folder was renamed away


def _top_level_packages(files) -> set[str]:
    """Distributions whose modules `files` import at module level (so whenever they are imported)."""
    dists = importlib.metadata.packages_distributions()
    out = set()
    for rel in files:
        for node in ast.parse((ROOT / rel).read_text()).body:
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            out |= {dists[r][0] for r in roots if r not in sys.stdlib_module_names and r != "pgolf"}
    return out


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.parametrize("change", [{}, {"train": {"device": "cpu"}, "compress": {"brotli": True}},
                                    {"train": {"device": "cpu"}, "model": {"attn_backend": "fa4"}}],
                         ids=["tiny", "cpu_brotli", "cpu_fa4"])
def test_requirements_name_the_packages_the_packed_script_imports(change):
    """requirements.txt for three param sets: the tiny profile (Triton kernels on CUDA, codec auto
    without brotli), a CPU run that also tries brotli and one whose attention runs on
    FlashAttention-4; each line `name==installed version` (the name alone where it is not
    installed here), and every package a packed file imports at module level is among them."""
    cfgs = {**TINY, **{s: dataclasses.replace(TINY[s], **kv) for s, kv in change.items()}}
    text = pack.requirements(cfgs)
    lines = text.splitlines()
    names = [line.split("==")[0] for line in lines]
    extra = ["flash-attn-4"] if "model" in change else ["brotli"] if change else ["triton"]
    assert names == ["torch", "numpy", "sentencepiece", "PyYAML", "tqdm", "zstandard", *extra]
    assert lines == [f"{n}=={_installed(n)}" if _installed(n) else n for n in names] and text.endswith("\n")
    assert _top_level_packages(pack.packed_files(cfgs)) <= set(names)


def test_refuses_a_non_empty_target_and_force_replaces_it(run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="not empty"):
        _export(run, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    _export(run, busy, force=True)
    assert (busy / "train_gpt.py").exists() and not (busy / "keep.txt").exists()


def test_refuses_over_the_cap_with_packed_code(run, tmp_path):
    size = json.loads((run / "metrics/size.json").read_text())
    update_metric(run, "size", under_cap=False, total_bytes=16_000_123)
    refused(run, tmp_path / "rec" / "x", "over the cap by 123 bytes")
    assert size["code_count"] == "packed train_gpt.py"


def test_refuses_an_artifact_other_than_the_scored_one(run, tmp_path):
    p = run / "artifacts/final/model.ptz"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    refused(run, tmp_path / "rec" / "x", "model.ptz: sha256 .* differs from the artifact metrics/eval.json scored")


def test_refuses_params_changed_since_the_run(run, tmp_path):
    p = run / "params.yaml"
    p.write_text(p.read_text().replace("seed: 1337", "seed: 42"))
    refused(run, tmp_path / "rec" / "x", r"params.yaml: train.seed is 42 but the run was made with 1337 \(dvc.lock")


def test_refuses_code_changed_since_the_run(run, tmp_path):
    p = run / "pgolf" / "shared" / "model.py"
    p.write_text(p.read_text() + "\n# a comment is not packed: no change\n")
    _export(run, tmp_path / "rec" / "ok")
    p.write_text(p.read_text() + "EDITED_AFTER_THE_RUN = 1\n")
    refused(run, tmp_path / "rec" / "x", "code or params changed since the run was scored")


def test_refuses_a_counted_script_that_is_not_the_one_measured(run, tmp_path):
    (run / "artifacts/final/train_gpt.py").write_bytes(b"print('hi')\n")
    refused(run, tmp_path / "rec" / "x", "train_gpt.py: not the script metrics/size.json counted")


def test_refuses_a_code_list_entry_outside_the_counted_files(run, tmp_path):
    p = run / "artifacts/final/code_files.json"
    listing = json.loads(p.read_text())
    listing["eval_files_raw"]["files"].append({"path": "../../../../etc/hostname", "bytes": 10})
    p.write_text(json.dumps(listing))
    refused(run, tmp_path / "rec" / "x", r"entry '../../../../etc/hostname' is not one of the counted code files")
    assert not list(tmp_path.glob("**/hostname"))


@pytest.mark.parametrize("name", ["eval", "size", "train"])
def test_names_missing_metrics(run, tmp_path, name):
    (run / "metrics" / f"{name}.json").unlink()
    refused(run, tmp_path / "rec" / "x", f"metrics/{name}.json: missing")


def test_empty_eval_metrics_is_a_clear_error(run, tmp_path):
    (run / "metrics/eval.json").write_text("{}")
    refused(run, tmp_path / "rec" / "x", r"metrics/eval.json: lacks val_loss, val_bpb, stride")


def test_corrupt_metrics_is_a_clear_error(run, tmp_path):
    (run / "metrics/size.json").write_text("{not json")
    refused(run, tmp_path / "rec" / "x", "metrics/size.json: not valid JSON")


def test_missing_train_log(run, tmp_path):
    (run / "artifacts/train/train.log").unlink()
    refused(run, tmp_path / "rec" / "x", "train.log: train log missing")


def test_refuses_a_failing_rule(run, tmp_path):
    update_metric(run, "train", train_seconds=612.0)
    refused(run, tmp_path / "rec" / "x", r"rules self-check failed(.|\n)*FAIL  train_time  612.0 s")


def test_seed_summary_and_logs_are_included(run, tmp_path):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    summary_ = {"n": 2, "val_bpb_mean": 2.41, "val_bpb_std": 0.01, "baseline_val_bpb": 2.5,
                "improvement_nats_mean": 0.1, "improvement_nats_std": 0.01, "min_improvement_nats": 0.005,
                "alpha": 0.01, "t": 13.4, "df": 1, "p_value": 0.02, "significant": False,
                "val_loss_mean": 4.0, "val_loss_std": 0.01,
                "runs": [{"name": "a", "rev": "r1", "seed": 1, "val_bpb": 2.4, "val_loss": 4.0},
                         {"name": "b", "rev": "r2", "seed": 2, "val_bpb": 2.42, "val_loss": 4.02}]}
    refused(run, tmp_path / "rec" / "x", "seeds/seeds.json: missing", seeds=seeds)
    (seeds / "seeds.json").write_text("{}")
    refused(run, tmp_path / "rec" / "x", "seeds.json: not a seed summary", seeds=seeds)
    (seeds / "seeds.json").write_text(json.dumps(summary_))
    (seeds / "train_seed1.log").write_text("seed 1\n")
    refused(run, tmp_path / "rec" / "x", "train_seed2.log: train log of a seed missing", seeds=seeds)
    (seeds / "train_seed2.log").write_text("seed 2\n")
    out = _export(run, tmp_path / "rec" / "x", seeds=seeds)
    assert (out / "train_seed1.log").read_text() == "seed 1\n" and (out / "train_seed2.log").exists()
    assert json.loads((out / "submission.json").read_text())["seeds"]["p_value"] == 0.02
    assert "does NOT meet the rule" in (out / "README.md").read_text()


def test_cli_reports_errors_without_traceback(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(run)
    (run / "metrics/eval.json").write_text("{}")
    assert export.main(["--out", str(tmp_path / "rec"), "--name", "n", "--author", "a", "--github-id", "g"]) == 1
    assert capsys.readouterr().err.startswith("export: error: ")


def test_summary_renders_every_figure(run):
    text = summary.render(run / "metrics")
    assert "val_bpb        2.4000" in text and "under the 16,000,000-byte cap" in text and "(lzma)" in text
    assert " (packed train_gpt.py); under" in text
    assert "12,345 tokens/s" in text


def test_export_readme_summarises_the_exported_run_not_the_cwd(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no metrics/ here
    out = _export(run, tmp_path / "rec")
    assert "12,345 tokens/s" in (out / "README.md").read_text()


def test_dvc_lock_floats_written_as_yaml_1_2_match_params(run, tmp_path):
    """DVC writes 1e-08 in dvc.lock, which PyYAML reads as a string: still the same value."""
    lock = run / "dvc.lock"
    lock.write_text(lock.read_text().replace("adam_eps: 1.0e-08", "adam_eps: '1e-08'"))
    assert "'1e-08'" in lock.read_text()
    assert _export(run, tmp_path / "rec").is_dir()
