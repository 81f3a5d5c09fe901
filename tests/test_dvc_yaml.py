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

from pgolf.compress.artifact import CODE_FILES
from pgolf.compress.pack import BAKED_SECTIONS, PACKED_FILES

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("params", "prepare", "train", "curves", "quantize", "compress", "evaluate")
PLUMBING = {"stages/__init__.py", "pgolf/__init__.py", "pgolf/config.py", "pgolf/shared/io.py", "pgolf/shared/tensorfile.py"}  # see dvc.yaml header
TRAINING_CODE = ("pgolf/train/train.py", "pgolf/train/loader.py", "pgolf/train/optim.py", "pgolf/train/hessian.py", "pgolf/shared/kernels")


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
    want = {*PACKED_FILES, "pgolf/compress/pack.py", *CODE_FILES}
    assert want <= set(deps), sorted(want - set(deps))
    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["compress"]["params"]
    assert set(BAKED_SECTIONS) <= set(params), sorted(set(BAKED_SECTIONS) - set(params))


def test_quantize_depends_on_its_own_code_and_params_only():
    """Exactly the files stages.quantize imports (+ its inputs): no packed-script source, codec or
    pruning code, no evaluate/summary file; only the quantize params (issue 11)."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["quantize"]
    code = {d for d in stage["deps"] if d.endswith(".py")}
    assert code == _imported_files("quantize") - PLUMBING
    for other in ("pgolf/compress/pack.py", "pgolf/compress/compress.py", "pgolf/compress/prune.py", "pgolf/compress/artifact.py", "pgolf/evaluate/evaluate.py",
                  "pgolf/shared/bpb.py", "pgolf/submit/summary.py", "pgolf/evaluate/ttt.py", "stages/evaluate.py"):
        assert other not in stage["deps"]
    assert stage["params"] == ["quantize"]
    assert set(stage["deps"]) - code == {"artifacts/train", "artifacts/params/quantize.json"}


# ----------------------------------------------------------------------------- the file layout

SOURCES = {"data/tokenizer_src"}  # committed inputs of prepare, not files passed between stages


def _layout_io() -> dict[str, dict[str, set[str]]]:
    """Per stage, the inter-stage files (pgolf.shared.layout) it reads (deps) and writes (outs, metrics, plots)."""
    from pgolf import config
    from pgolf.shared import layout as L

    def p(*paths) -> set[str]:
        return {Path(x).as_posix() for x in paths}

    return {
        "params": {"deps": set(), "outs": p(*map(L.params_file, config.SECTIONS))},
        "prepare": {"deps": p(L.params_file("prepare")), "outs": p(L.TOKENIZER, L.SHARDS),
                    "metrics": p(L.PREPARE_METRICS)},
        "train": {"deps": p(L.SHARDS, L.TOKENIZER, L.params_file("model"), L.params_file("train")),
                  "outs": p(L.TRAIN), "metrics": p(L.TRAIN_METRICS), "plots": p(L.TRAIN_TSV)},
        "curves": {"deps": p(L.TRAIN_TSV), "plots": p(L.TRAIN_PNG)},
        "quantize": {"deps": p(L.TRAIN, L.params_file("quantize")), "outs": p(L.QUANT), "metrics": p(L.QUANT_METRICS)},
        "compress": {"deps": p(L.QUANT, L.params_file("compress")), "outs": p(L.FINAL), "metrics": p(L.SIZE_METRICS)},
        "evaluate": {"deps": p(L.FINAL, L.SHARDS, L.TOKENIZER, L.params_file("evaluate")),
                     "metrics": p(L.EVAL_METRICS)},
    }


def _entries(items) -> set[str]:
    """The paths of a dvc.yaml outs/metrics/plots list (entries are strings or {path: options})."""
    return {next(iter(e)) if isinstance(e, dict) else e for e in items or []}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_files_are_the_layout_modules_paths(stage):
    """dvc.yaml cannot import pgolf.shared.layout: its outs/metrics/plots and the data deps of every stage
    must equal the layout's paths, so that the code and the DAG cannot drift apart."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    want = _layout_io()[stage]
    data_deps = {d for d in _deps(stage) if not d.startswith(("pgolf/", "stages/"))} - SOURCES
    assert data_deps == want["deps"]
    for key in ("outs", "metrics", "plots"):
        assert _entries(spec.get(key)) == want.get(key, set()), key


def test_top_level_plots_read_the_layouts_tsv():
    from pgolf.shared import layout

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    assert {f for entry in plots for spec in entry.values() for f in spec["y"]} == {layout.TRAIN_TSV.as_posix()}
