"""pgolf's folders are the pipeline's DAG. pgolf/shared/ (formats, I/O, paths, the model, val_bpb)
imports no stage folder; a stage folder imports only pgolf/shared, pgolf/config.py and the folders
of the stages upstream of it; pgolf/submit/ (after the pipeline) may import any stage folder and
none imports it. So a stage's DVC deps can be its own folder plus those (tests/test_dvc_yaml.py).
Checked on the import statements themselves (ast, imports inside functions included). Also: every
folder says what it owns, the range checks pgolf.config loads by name (CHECKS) still import, and
every `python -m pgolf.<name>` the README documents still runs, from a tiny top-level entry module."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PGOLF = ROOT / "pgolf"

# stage folder -> the stage folders directly upstream of it (dvc.yaml's DAG; params, the gate, runs
# first and imports only shared: the range checks it runs are loaded by name through pgolf.config)
UPSTREAM: dict[str, tuple[str, ...]] = {
    "params": (),
    "prepare": (),
    "train": ("prepare",),
    "curves": ("train",),
    "quantize": ("train",),
    "compress": ("quantize",),
    "evaluate": ("compress",),
    "submit": ("evaluate", "curves"),
}
SHARED = "shared"
TOP_LEVEL = {"__init__", "config"}  # pgolf/__init__.py and the params schema; the rest at the top are entry modules


def _allowed(folder: str) -> set[str]:
    """Folders `folder` may import: itself, shared and every stage folder upstream of it."""
    out, todo = {folder, SHARED}, list(UPSTREAM.get(folder, ()))
    while todo:
        f = todo.pop()
        if f not in out:
            out.add(f)
            todo.extend(UPSTREAM[f])
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Dotted names of the pgolf modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _module_name(path).split(".")[:None if path.name == "__init__.py" else -1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pgolf import config`: pgolf.config
    return {n for n in out if n.split(".")[0] == "pgolf"}


def _folder_of(dotted: str) -> str | None:
    """The folder of pgolf that a dotted name lies in (None: pgolf itself or a top-level module)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and (PGOLF / parts[1]).is_dir() else None


def _sources() -> list[Path]:
    return sorted(p for p in PGOLF.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_folders_are_shared_and_one_per_stage_each_saying_what_it_owns():
    folders = {p.name for p in PGOLF.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {SHARED, *UPSTREAM}
    for folder in folders:
        init = PGOLF / folder / "__init__.py"
        assert init.is_file(), init
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init}: no docstring"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_pipeline(path):
    rel = path.relative_to(PGOLF)
    imported = _imports(path)
    if len(rel.parts) == 1:  # a top-level module
        if rel.stem in TOP_LEVEL:
            assert not imported, f"pgolf/{rel} imports {sorted(imported)}"
        return  # entry modules: test_documented_commands_are_entry_modules_of_their_owner
    folder = rel.parts[0]
    bad = sorted(n for n in imported if _folder_of(n) and _folder_of(n) not in _allowed(folder))
    assert not bad, f"pgolf/{rel} (folder {folder}) imports {bad}: not shared, not upstream of {folder}"
    top = sorted(n for n in imported if not _folder_of(n) and n != "pgolf" and n.split(".")[1] not in TOP_LEVEL)
    assert not top, f"pgolf/{rel} imports the entry module(s) {top}; import their owner in a folder"


def test_the_import_check_sees_an_upward_import(tmp_path):
    """The parser catches what the rule forbids: shared importing a stage, quantize importing compress."""
    (tmp_path / "m.py").write_text("import os\ndef f():\n    from pgolf.compress import pack\n"
                                   "    from pgolf.shared import io\n    import pgolf.quantize.gptq as g\n")
    names = _imports(tmp_path / "m.py")
    assert names == {"pgolf.compress.pack", "pgolf.shared.io", "pgolf.quantize.gptq"}
    assert {_folder_of(n) for n in names} - _allowed(SHARED) == {"compress", "quantize"}
    assert {_folder_of(n) for n in names} - _allowed("quantize") == {"compress"}
    assert {_folder_of(n) for n in names} - _allowed("evaluate") == set()


def test_range_checks_loaded_by_name_still_import():
    """pgolf.config runs each section's check_config from the module CHECKS names (the params stage
    runs them all): each imports, has it, and lies in the folder of the stage owning the section."""
    from pgolf import config

    assert set(config.CHECKS) == set(config.SECTIONS)
    for section, name in config.CHECKS.items():
        assert callable(importlib.import_module(name).check_config), name
        assert _folder_of(name) == (SHARED if section == "model" else section), (section, name)


def _documented_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"python -m (pgolf\.[a-z_]+)\b", readme)))


def test_readme_documents_the_entry_modules():
    assert _documented_commands() == ["pgolf.export", "pgolf.fineweb", "pgolf.profiles", "pgolf.rules",
                                      "pgolf.seeds", "pgolf.summary"]


@pytest.mark.parametrize("command", _documented_commands())
def test_documented_commands_are_entry_modules_of_their_owner(command):
    """`python -m pgolf.X` runs the `main` of pgolf.<folder>.X, the module that owns the code."""
    name = command.split(".")[1]
    entry = PGOLF / f"{name}.py"
    assert entry.is_file(), entry
    owners = [n for n in _imports(entry) if _folder_of(n)]
    assert len(owners) == 1 and owners[0].endswith(f".{name}.main"), owners
    owner = importlib.import_module(owners[0].rsplit(".", 1)[0])
    assert importlib.import_module(f"pgolf.{name}").main is owner.main
    args = ["metrics"] if name == "summary" else ["--help"]  # summary takes a metrics folder, no options
    p = subprocess.run([sys.executable, "-m", command, *args], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("pgolf summary" if name == "summary" else "usage:"), p.stdout[:200]
