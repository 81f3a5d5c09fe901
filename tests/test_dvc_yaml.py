"""dvc.yaml's deps are the truth about what each stage runs, at the grain of pgolf's folders: a
stage's code deps are its entry point (stages/<stage>.py) and exactly the folders holding a pgolf
module it imports, its own pgolf/<stage>/ and pgolf/shared/ among them (tests/test_folders.py keeps
the others upstream of it). So every pgolf module a stage imports lies under a dep (else editing it
would not rerun the stage) and no folder is a dep of a stage that imports nothing from it.
Training code (pgolf/train/) is not a dep of quantize or evaluate, and of compress only as sources
packed into train_gpt.py; compress, the one stage that counts code bytes (the packed script's) and
owns the byte budget, depends on every packed source and every baked params section, so editing
any of them recounts; quantize depends on its own folder, pgolf/shared and its params only, so a
file only compress, evaluate or summary uses never reruns it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.compress.pack import BAKED_SECTIONS, CODE_FILES, PACKED_FILES

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("params", "prepare", "data_check", "train", "curves", "quantize", "compress", "evaluate")
PLUMBING = {"stages/__init__.py", "pgolf/__init__.py", "pgolf/config.py"}  # see dvc.yaml header
TRAINING_CODE = "pgolf/train"  # the folder of the train stage


def _deps(stage: str) -> list[str]:
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return [d for d in doc["stages"][stage]["deps"] if not d.startswith("${")]


def _code_deps(stage: str) -> set[str]:
    return {d for d in _deps(stage) if d.startswith(("pgolf/", "stages/"))}


def _imported_files(stage: str) -> set[str]:
    """The pgolf and stages files `python -m stages.<stage>` imports when it loads, and those its
    code may import later: a module imported inside a function (an optional feature's, under its
    param) counts too (`_lazy_closure`)."""
    code = (f"import sys, importlib; importlib.import_module('stages.{stage}'); "
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] in ('pgolf', 'stages') and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return _lazy_closure({str(Path(f).resolve().relative_to(ROOT)) for f in out.split()})


def _module_file(name: str) -> str | None:
    """pgolf.a.b -> pgolf/a/b.py or pgolf/a/b/__init__.py (None for a name that is neither)."""
    base = ROOT / Path(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return str(f.relative_to(ROOT))
    return None


def _lazy_closure(files: set[str]) -> set[str]:
    """`files` plus every pgolf module they import anywhere in their code (function bodies too),
    transitively, with the packages above each."""
    import ast

    todo, seen = list(files), set(files)
    while todo:
        tree = ast.parse((ROOT / todo.pop()).read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    f = _module_file(".".join(parts[:i])) if parts[0] == "pgolf" else None
                    if f and f not in seen:
                        seen.add(f)
                        todo.append(f)
    return seen


def _covered(path: str, deps) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _grain(path: str) -> str:
    """The dep that stands for a code file: its folder pgolf/<folder> for a module of a stage folder
    or of pgolf/shared, the file itself otherwise (stages/*.py, pgolf/config.py, and pgolf/submit/,
    which runs after the pipeline and whose only packed module is the recipe)."""
    parts = path.split("/")
    return "/".join(parts[:2]) if parts[0] == "pgolf" and len(parts) > 2 and parts[1] != "submit" else path


@pytest.mark.parametrize("stage", STAGES)
def test_every_imported_module_is_a_dep(stage):
    deps = _deps(stage)
    missing = sorted(f for f in _imported_files(stage) - PLUMBING if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage} imports {missing} without listing them as deps"


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_the_folders_the_stage_imports(stage):
    """stages/<stage>.py + pgolf/<stage> + pgolf/shared + the upstream folders it imports, nothing else
    (compress: also what it counts, the packed sources and CODE_FILES; the two gates: also the schema,
    pgolf/config.py, whose checks they run; data_check's code lives in pgolf/params)."""
    needed = _imported_files(stage) - PLUMBING
    if stage == "compress":
        needed |= {*PACKED_FILES, *CODE_FILES}
    if stage in ("params", "data_check"):
        needed.add("pgolf/config.py")
    assert _code_deps(stage) == {_grain(f) for f in needed}
    folder = "pgolf/params" if stage == "data_check" else f"pgolf/{stage}"
    assert {f"stages/{stage}.py", folder, "pgolf/shared"} <= _code_deps(stage)


@pytest.mark.parametrize("stage", ("quantize", "compress", "evaluate"))
def test_downstream_stages_depend_on_training_code_only_as_packed_sources(stage):
    train = [d for d in _deps(stage) if _covered(d, [TRAINING_CODE])]
    if stage != "compress":
        assert not train
    else:  # every file under such a dep is packed into train_gpt.py
        files = {str(p.relative_to(ROOT)) for d in train for p in (ROOT / d).rglob("*.py")}
        assert train and files <= set(PACKED_FILES), sorted(files - set(PACKED_FILES))


def test_evaluation_code_carries_no_training_code():
    """CODE_FILES (what scoring the artifact needs) holds no training module, the token loader included."""
    assert not [f for f in CODE_FILES if _covered(f, [TRAINING_CODE])]


def test_compress_counts_code_bytes_so_depends_on_every_packed_source_and_baked_param():
    deps = _deps("compress")
    want = {*PACKED_FILES, "pgolf/compress/pack.py", *CODE_FILES}
    assert not [f for f in want if not _covered(f, deps)]
    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["compress"]["params"]
    assert set(BAKED_SECTIONS) <= set(params), sorted(set(BAKED_SECTIONS) - set(params))


def test_quantize_depends_on_its_own_code_and_params_only():
    """Its entry point, its folder and pgolf/shared (+ its inputs): no packed-script source, codec or
    pruning code, no evaluate/summary file; only the quantize params (issue 11)."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["quantize"]
    code = _code_deps("quantize")
    assert code == {"stages/quantize.py", "pgolf/quantize", "pgolf/shared"}
    for other in ("pgolf/compress/pack.py", "pgolf/compress/compress.py", "pgolf/compress/prune.py",
                  "pgolf/compress/artifact.py", "pgolf/evaluate/evaluate.py", "pgolf/evaluate/ttt.py",
                  "pgolf/submit/summary.py", "stages/evaluate.py", "pgolf/train/train.py"):
        assert not _covered(other, stage["deps"]), other
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
        "data_check": {"deps": p(L.TOKENIZER, L.PREPARE_METRICS, *map(L.params_file, ("model", "train", "evaluate"))),
                       "outs": p(L.DATA_CHECK)},
        "train": {"deps": p(L.SHARDS, L.TOKENIZER, L.params_file("model"), L.params_file("train"), L.DATA_CHECK),
                  "outs": p(L.TRAIN), "metrics": p(L.TRAIN_METRICS), "plots": p(L.TRAIN_TSV)},
        "curves": {"deps": p(L.TRAIN_TSV), "plots": p(L.TRAIN_PNG)},
        "quantize": {"deps": p(L.TRAIN, L.params_file("quantize")), "outs": p(L.QUANT), "metrics": p(L.QUANT_METRICS)},
        "compress": {"deps": p(L.QUANT, *map(L.params_file, BAKED_SECTIONS)), "outs": p(L.FINAL),
                     "metrics": p(L.SIZE_METRICS)},
        "evaluate": {"deps": p(L.FINAL, L.SHARDS, L.TOKENIZER, L.params_file("evaluate"), L.DATA_CHECK),
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


def test_bytecode_in_a_code_folder_is_not_a_dep_change():
    """Code deps are folders, and imports (pytest, the stages) write __pycache__ into them: DVC must
    ignore bytecode, or every stage would look changed after the tests ran (and dvc.lock would hash
    machine-specific .pyc files)."""
    from dvc.repo import Repo

    repo = Repo(str(ROOT))
    pyc = ROOT / "pgolf" / "shared" / "__pycache__" / "io.cpython-311.pyc"
    assert repo.dvcignore.is_ignored(repo.fs, str(pyc))
    assert repo.dvcignore.is_ignored(repo.fs, str(ROOT / "pgolf" / "shared" / "stray.pyc"))
    assert not repo.dvcignore.is_ignored(repo.fs, str(ROOT / "pgolf" / "shared" / "io.py"))


def test_every_profiles_param_paths_are_dvc_paths():
    """A `${section.key}` dep takes its path from params.yaml; an empty one stops `dvc repro` with
    "unexpected error" (pr2135's `prepare.val_source: ""` did). Every profile,
    and the config check of any params.yaml, gives a non-empty path."""
    from pgolf import config
    from pgolf.params import profiles

    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    keys = {d[2:-1] for s in doc["stages"].values() for d in s.get("deps", []) if d.startswith("${")}
    assert keys == {"prepare.corpus", "prepare.val_source"}
    for name in profiles.available(ROOT):
        params = profiles.resolve(name, ROOT)
        for key in keys:
            section, field = key.split(".")
            assert isinstance(params[section][field], str) and params[section][field].strip(), (name, key)
    for key in keys:
        section, field = key.split(".")
        with pytest.raises(config.ConfigError, match=f"{key} must"):
            config.from_dict(section, {field: ""})
