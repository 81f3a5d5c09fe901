"""dvc.yaml's deps are the truth about what each stage runs: every pgolf module a stage imports is
a dep of it (else editing that module would not rerun the stage), training code is not a dep of
quantize or evaluate, and of compress only as a source packed into train_gpt.py; compress, the one
stage that counts code bytes (the packed script's) and owns the byte budget, depends on every
packed source and every baked params section, so editing any of them recounts; quantize depends
on its own code and params only, so a file only evaluate or summary uses never reruns it."""

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
TRAINING_CODE = ("pgolf/train.py", "pgolf/loader.py", "pgolf/optim.py", "pgolf/hessian.py", "pgolf/kernels")


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
    allowed = set(PACKED_FILES) if stage == "compress" else set()
    assert not [d for d in deps if d.startswith(TRAINING_CODE) and d not in allowed]


def test_evaluation_code_carries_no_training_code():
    """CODE_FILES (what scoring the artifact needs) holds no training module, the token loader included."""
    assert not [f for f in CODE_FILES if f.startswith(TRAINING_CODE)]


def test_compress_counts_code_bytes_so_depends_on_every_packed_source_and_baked_param():
    deps = _deps("compress")
    want = {*PACKED_FILES, "pgolf/pack.py", *CODE_FILES}
    assert want <= set(deps), sorted(want - set(deps))
    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["compress"]["params"]
    assert set(BAKED_SECTIONS) <= set(params), sorted(set(BAKED_SECTIONS) - set(params))


def test_quantize_depends_on_its_own_code_and_params_only():
    """Exactly the files stages.quantize imports (+ its inputs): no packed-script source, codec or
    pruning code, no evaluate/summary file; only the quantize params (issue 11)."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["quantize"]
    code = {d for d in stage["deps"] if d.endswith(".py")}
    assert code == _imported_files("quantize") - PLUMBING
    for other in ("pgolf/pack.py", "pgolf/compress.py", "pgolf/prune.py", "pgolf/artifact.py", "pgolf/evaluate.py",
                  "pgolf/bpb.py", "pgolf/summary.py", "pgolf/ttt.py", "stages/evaluate.py"):
        assert other not in stage["deps"]
    assert stage["params"] == ["quantize"]
    assert set(stage["deps"]) - code == {"artifacts/train", "artifacts/params/quantize.json"}
