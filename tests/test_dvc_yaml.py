"""dvc.yaml's deps are the truth about what each stage runs: every pgolf module a stage imports is
a dep of it (else editing that module would not rerun the stage), training code is not a dep of
evaluate, and of quantize/compress only as a source packed into train_gpt.py; the stages that
count code bytes (the packed script's) depend on every packed source and every baked params
section, so editing any of them recounts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.artifact import CODE_FILES
from pgolf.pack import BAKED_SECTIONS, PACKED_FILES

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("params", "prepare", "train", "curves", "quantize", "compress", "evaluate")
PLUMBING = {"stages/__init__.py", "pgolf/__init__.py", "pgolf/config.py", "pgolf/io.py", "pgolf/tensorfile.py"}  # see dvc.yaml header
TRAINING_CODE = ("pgolf/train.py", "pgolf/optim.py", "pgolf/hessian.py", "pgolf/kernels")


def _deps(stage: str) -> list[str]:
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return [d for d in doc["stages"][stage]["deps"] if not d.startswith("${")]


def _imported_files(stage: str) -> set[str]:
    code = (f"import sys, importlib; importlib.import_module('stages.{stage}'); "
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] in ('pgolf', 'stages') and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {str(Path(f).resolve().relative_to(ROOT)) for f in out.split()}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_every_imported_module_is_a_dep(stage):
    deps = _deps(stage)
    missing = sorted(f for f in _imported_files(stage) - PLUMBING if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage} imports {missing} without listing them as deps"


@pytest.mark.parametrize("stage", ("quantize", "compress", "evaluate"))
def test_downstream_stages_depend_on_training_code_only_as_packed_sources(stage):
    deps = _deps(stage)
    allowed = set(PACKED_FILES) if stage != "evaluate" else set()
    assert not [d for d in deps if d.startswith(TRAINING_CODE) and d not in allowed]


@pytest.mark.parametrize("stage", ("quantize", "compress"))
def test_stages_counting_code_bytes_depend_on_every_packed_source_and_baked_param(stage):
    deps = _deps(stage)
    want = {*PACKED_FILES, "pgolf/pack.py", *(CODE_FILES if stage == "compress" else ())}
    assert want <= set(deps), sorted(want - set(deps))
    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["params"]
    assert set(BAKED_SECTIONS) <= set(params), sorted(set(BAKED_SECTIONS) - set(params))
