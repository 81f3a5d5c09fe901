"""pgolf's folders are the pipeline's DAG. pgolf/shared/ (formats, I/O, paths, the model, val_bpb)
imports no stage folder; a stage folder imports only pgolf/shared, pgolf/config.py and the folders
of the stages upstream of it; pgolf/submit/ (after the pipeline) may import any stage folder and
none imports it. So a stage's DVC deps can be its own folder plus those (tests/test_dvc_yaml.py).
Checked on the import statements themselves (ast, imports inside functions included). Also: every
folder says what it owns, pgolf.config imports nothing of pgolf, and
every `pgolf <subcommand>` the README documents is the main of the module that owns it, with --help."""

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
TOP_LEVEL = {"__init__", "config"}  # pgolf/__init__.py and the params schema; the rest at the top: the pgolf command


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
        return  # the pgolf command: test_each_subcommand_is_the_main_of_its_owner_and_has_help
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


def test_config_and_the_gate_load_no_stage_folder():
    """pgolf.config (the schema and every section's checks) imports nothing of pgolf; the params
    gates import only pgolf.config and pgolf/shared (checked by the rule above: params has no
    upstream folder)."""
    assert not _imports(PGOLF / "config.py")
    assert UPSTREAM["params"] == ()


def _documented_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"(?<![\w/.-])pgolf (summary|profiles|export|rules|seeds|fineweb)\b", readme)))


def test_readme_documents_every_subcommand_of_the_pgolf_command():
    from pgolf import cli

    assert _documented_commands() == sorted(cli.SUBCOMMANDS)
    assert not re.search(r"python -m pgolf\.\w", (ROOT / "README.md").read_text())  # the old alias modules are gone


@pytest.mark.parametrize("name", sorted(__import__("pgolf.cli").cli.SUBCOMMANDS))
def test_each_subcommand_is_the_main_of_its_owner_and_has_help(name):
    """`pgolf NAME` runs the `main(argv)` of the module that owns the code, in a folder of pgolf."""
    from pgolf import cli

    owner = cli.SUBCOMMANDS[name][0]
    assert _folder_of(owner) in UPSTREAM and callable(importlib.import_module(owner).main)
    p = subprocess.run([sys.executable, "-m", "pgolf", name, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(f"usage: pgolf {name}"), p.stdout[:200]


def test_pgolf_alone_lists_the_subcommands():
    p = subprocess.run([sys.executable, "-m", "pgolf", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and all(name in p.stdout for name in ("summary", "profiles", "export", "rules"))
    p = subprocess.run([sys.executable, "-m", "pgolf", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice: 'nope'" in p.stderr
