"""pgolf.curves.curves / stage `curves`: plots/train.tsv drawn as a PNG that DVC declares as a plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.curves import curves

ROOT = Path(__file__).resolve().parents[1]
TSV = "step\ttrain_loss\tlr_scale\ttokens_per_second\n1\t6.9\t1.0\t14000.0\n10\t5.7\t1.0\t15000.0\n20\t5.1\t0.5\t15100.0\n"


def test_png_of_the_three_series_is_deterministic(tmp_path):
    (tmp_path / "train.tsv").write_text(TSV)
    a = curves.run(tmp_path / "train.tsv", tmp_path / "a.png").read_bytes()
    b = curves.run(tmp_path / "train.tsv", tmp_path / "b.png").read_bytes()
    assert a[:8] == b"\x89PNG\r\n\x1a\n" and a == b


@pytest.mark.parametrize("text, why", [(None, "not found"), ("step\ttrain_loss\n1\t2\n", "expected a header"),
                                       ("step\ttrain_loss\tlr_scale\ttokens_per_second\n", "expected a header"),
                                       (TSV.replace("5.7", "5,7"), "a value is not a number")],
                         ids=["missing", "columns", "no rows", "not a number"])
def test_bad_tsv_is_an_error_naming_it(tmp_path, text, why):
    if text is not None:
        (tmp_path / "train.tsv").write_text(text)
    with pytest.raises(curves.CurvesError, match=f"train.tsv: {why}"):
        curves.run(tmp_path / "train.tsv", tmp_path / "train.png")
    assert not (tmp_path / "train.png").exists()


def test_stage_cli(tmp_path):
    def run():
        return subprocess.run([sys.executable, "-m", "stages.curves"], cwd=tmp_path, capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    p = run()
    assert p.returncode == 1 and p.stderr.startswith("curves: error: plots/train.tsv: not found"), p.stderr
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/train.tsv").write_text(TSV)
    p = run()
    assert p.returncode == 0 and (tmp_path / "plots/train.png").is_file(), p.stderr


def test_dvc_declares_the_png_as_a_plot_of_the_curves_stage():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["curves"]
    assert "plots/train.tsv" in stage["deps"]
    assert stage["plots"] == [{"plots/train.png": {"cache": False}}]
