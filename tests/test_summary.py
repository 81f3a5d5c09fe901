"""pgolf.submit.summary: the end-of-pipeline summary from metrics/*.json, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.submit import summary
from pgolf.shared.io import MetricsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def metrics(tmp_path) -> Path:
    shutil.copytree(ROOT / "metrics", tmp_path / "metrics")
    return tmp_path / "metrics"


def _cli(metrics: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgolf", "summary", str(metrics)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_committed_metrics_render():
    text = summary.render(ROOT / "metrics")
    assert text.startswith("pgolf summary\n  val_bpb ") and "under the 16,000,000-byte cap" in text


def test_quantized_line_names_the_bit_width(metrics):
    quant = json.loads((metrics / "quant.json").read_text())
    quant["bits"] = 5
    (metrics / "quant.json").write_text(json.dumps(quant))
    assert f"{quant['int6_tensors']} int5 tensors" in summary.render(metrics)


@pytest.mark.parametrize("content", ['{"val_bpb": ', "[1, 2]", "\xff\xfe", '{"val_bpb": 1.0}'])
def test_a_corrupt_metrics_file_is_an_error_naming_it(metrics, content):
    (metrics / "eval.json").write_text(content, encoding="latin-1")
    with pytest.raises(MetricsError, match=r"eval\.json: "):
        summary.render(metrics)
    p = _cli(metrics)
    assert p.returncode == 1 and p.stderr.startswith(f"summary: error: {metrics / 'eval.json'}: "), p.stderr
    assert "Traceback" not in p.stderr


def test_missing_files_are_left_out(metrics):
    (metrics / "eval.json").unlink()
    text = summary.render(metrics)
    assert "val_bpb        " not in text and "artifact " in text
