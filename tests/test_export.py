"""The records-folder export and the end-of-pipeline summary, on a synthetic finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgolf import export, summary

METRICS = {
    "prepare": {"vocab_size": 1024, "train_tokens": 1000, "val_tokens": 500, "val_bytes": 1200,
                "train_docs": 3, "val_docs": 2},
    "train": {"steps": 10, "train_seconds": 1.5, "tokens_per_second": 12345.0, "world_size": 1,
              "val_bpb_float": 2.5, "peak_memory_mb": 0.0},
    "quant": {"int6_tensors": 4, "passthrough_tensors": 7, "pruned_values": 12, "quantize_seconds": 0.2},
    "size": {"codec": "lzma", "lzma_bytes": 900, "zstd_bytes": 950, "model_bytes": 900, "code_bytes": 100,
             "total_bytes": 1000, "cap_bytes": 16000000, "under_cap": True},
    "eval": {"val_loss": 4.0, "val_bpb": 2.4, "stride": 64, "context": 256, "scored_tokens": 499,
             "scored_bytes": 1199, "eval_seconds": 0.3},
}


def _finished_run(root: Path, size_update: dict | None = None) -> Path:
    (root / "metrics").mkdir(parents=True)
    for name, m in METRICS.items():
        m = {**m, **(size_update or {})} if name == "size" else m
        (root / "metrics" / f"{name}.json").write_text(json.dumps(m))
    final = root / "artifacts" / "final"
    final.mkdir(parents=True)
    (final / "model.ptz").write_bytes(b"x" * 900)
    (root / "pgolf").mkdir()
    (root / "pgolf" / "model.py").write_text("# model\n")
    (final / "code_files.json").write_text(json.dumps({"files": [{"path": "pgolf/model.py", "bytes": 8}], "total": 8}))
    (root / "artifacts" / "train").mkdir()
    (root / "artifacts" / "train" / "train.log").write_text("step 1\n")
    (root / "params.yaml").write_text("train:\n  seed: 1\n")
    return root


def test_export_writes_a_records_folder(tmp_path):
    root = _finished_run(tmp_path / "run")
    out = export.export(root, tmp_path / "rec", "My run", "Jane", "jdoe", "blurb")
    sub = json.loads((out / "submission.json").read_text())
    assert sub["val_bpb"] == 2.4 and sub["bytes_total"] == 1000 and sub["bytes_code"] == 100
    assert sub["pre_quant_val_bpb"] == 2.5 and sub["codec"] == "lzma"
    text = (out / "README.md").read_text()
    assert "val_bpb 2.40000" in text and "1,000 bytes" in text
    assert (out / "model.ptz").read_bytes() == b"x" * 900
    assert (out / "code" / "pgolf" / "model.py").exists() and (out / "train.log").exists()
    assert (out / "metrics_eval.json").exists()


def test_export_refuses_over_cap_and_non_empty_target(tmp_path):
    root = _finished_run(tmp_path / "run", {"under_cap": False, "total_bytes": 16_000_123})
    with pytest.raises(export.ExportError, match="over the cap by 123 bytes"):
        export.export(root, tmp_path / "rec", "n", "a", "g", "")
    ok = _finished_run(tmp_path / "run2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="not empty"):
        export.export(ok, tmp_path / "busy", "n", "a", "g", "")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_export_names_missing_metrics(tmp_path):
    root = _finished_run(tmp_path / "run")
    (root / "metrics" / "eval.json").unlink()
    with pytest.raises(export.ExportError, match="eval.json"):
        export.export(root, tmp_path / "rec", "n", "a", "g", "")


def test_summary_renders_every_figure(tmp_path):
    root = _finished_run(tmp_path / "run")
    text = summary.render(root / "metrics")
    assert "val_bpb        2.4000" in text
    assert "1,000 bytes" in text and "under the 16,000,000-byte cap" in text and "(lzma)" in text
    assert "12,345 tokens/s" in text


def test_export_readme_summarises_the_exported_run_not_the_cwd(tmp_path, monkeypatch):
    root = _finished_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # no metrics/ here
    out = export.export(root, tmp_path / "rec", "n", "a", "g", "")
    assert "12,345 tokens/s" in (out / "README.md").read_text()
