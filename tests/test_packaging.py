"""pyproject.toml: installs without setuptools deprecation warnings, and declares what the
pipeline imports (scripts/setup.sh and CI install exactly these)."""

from __future__ import annotations

import os
import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_deprecation_warnings(monkeypatch):
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "`project.license` as a TOML table is deprecated"
        dist = apply_configuration(Distribution(), os.fspath(ROOT / "pyproject.toml"))
    assert dist.metadata.license_expression == "MIT"


def test_build_requires_a_setuptools_that_reads_spdx_license_strings():
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "setuptools>=77" in doc["build-system"]["requires"]  # SPDX `license = "MIT"` needs >= 77


def test_runtime_dependencies_cover_the_stages_imports():
    deps = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    for name in ("torch", "dvc", "sentencepiece", "numpy", "zstandard", "pyyaml", "tqdm", "matplotlib"):
        assert name in deps, name
