"""pgolf.compress.pack: the packed train_gpt.py is deterministic, holds exactly the recipe's sources and the
baked params, runs its bootstrap, and its file list covers every module pgolf.submit.recipe imports."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf import config
from pgolf.compress import pack

ROOT = Path(__file__).resolve().parents[1]
TINY = config.load_all(config.read_doc(ROOT / "params.yaml"))  # the checked sections of the committed params


def test_script_is_deterministic_and_roundtrips_sources_and_params():
    a, b = pack.build_script(ROOT, TINY), pack.build_script(ROOT, dict(TINY))
    assert a == b and a.isascii()
    archive = pack.unpack(a)
    assert sorted(archive["files"]) == sorted(pack.PACKED_FILES)
    for rel, text in archive["files"].items():
        assert text == pack.strip_source((ROOT / rel).read_text(encoding="utf-8"))
    assert archive["params"] == {s: config.to_dict(TINY[s]) for s in pack.BAKED_SECTIONS}
    assert set(archive["params"]) == set(pack.BAKED_SECTIONS)
    raw = sum((ROOT / f).stat().st_size for f in pack.PACKED_FILES)
    assert len(a) < raw / 2  # packed: well under half the raw sources


def test_stripped_sources_parse_to_the_same_tree_without_docstrings():
    for rel in pack.PACKED_FILES:
        text = (ROOT / rel).read_text(encoding="utf-8")
        stripped = pack.strip_source(text)
        assert ast.dump(ast.parse(stripped)) == ast.dump(pack.without_docstrings(ast.parse(text))), rel
        assert "#" not in stripped or all(not line.lstrip().startswith("#") for line in stripped.splitlines())
    total = sum(len(pack.strip_source((ROOT / f).read_text(encoding="utf-8"))) for f in pack.PACKED_FILES)
    assert total < 0.8 * sum((ROOT / f).stat().st_size for f in pack.PACKED_FILES)


def test_strip_source_keeps_strings_and_drops_only_comments_docstrings_and_blank_lines():
    src = (
        '"""Module doc → with a non-ASCII arrow."""\n'
        "import os  # a comment\n"
        "\n"
        "class E(ValueError):\n"
        '    """Only a docstring."""\n'
        "\n"
        "def f(x):  # é\n"
        '    """Doc\n'
        '    on two lines."""\n'
        '    s = """keep   \n'
        "\n"
        '  # not a comment\n"""\n'
        '    return x + "#" + s  # trailing\n'
    )
    out = pack.strip_source(src)
    assert out == ("import os\n"
                   "class E(ValueError):\n"
                   "    pass\n"
                   "def f(x):\n"
                   '    s = """keep   \n'
                   "\n"
                   '  # not a comment\n"""\n'
                   '    return x + "#" + s\n')
    namespace: dict = {}
    exec(compile(out, "<stripped>", "exec"), namespace)
    assert namespace["f"]("a") == 'a#keep   \n\n  # not a comment\n' and namespace["E"].__doc__ is None


def test_params_change_the_script():
    other = pack.build_script(ROOT, {**TINY, "evaluate": dataclasses.replace(TINY["evaluate"], stride=32)})
    assert other != pack.build_script(ROOT, TINY)
    assert pack.unpack(other)["params"]["evaluate"]["stride"] == 32
    same = {**TINY, "prepare": dataclasses.replace(TINY["prepare"], workers=1)}  # not baked: the script prepares itself
    assert pack.build_script(ROOT, same) == pack.build_script(ROOT, TINY)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(pack.PackError, match=r"pgolf/__init__.py: source file of the packed train_gpt.py missing"):
        pack.build_script(tmp_path, TINY)


def test_packed_files_are_what_the_recipe_imports():
    """Every pgolf module the script's entry point imports (plus the Triton kernels, which
    pgolf.shared.model imports lazily on CUDA), and nothing else."""
    code = ("import sys, importlib; importlib.import_module('pgolf.submit.recipe'); importlib.import_module('pgolf.shared.kernels'); "
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] == 'pgolf' and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    imported = {str(Path(f).resolve().relative_to(ROOT)) for f in out.split()}
    assert imported == set(pack.PACKED_FILES)


def test_bootstrap_unpacks_and_reports_a_missing_data_layout(tmp_path):
    """The script runs from any folder: it unpacks itself, validates the baked params and names the
    challenge data it did not find (the full run is tests/test_submission.py)."""
    script = tmp_path / "train_gpt.py"
    script.write_bytes(pack.build_script(ROOT, TINY))
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1
    assert "data/datasets/fineweb10B_sp1024: challenge shard folder not found" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "pgolf_run").exists()


def test_bootstrap_names_a_bad_baked_param(tmp_path):
    """The baked values were checked by the params gate; the script types them again (no range
    checks) and names one that is not of its field's type."""
    script = tmp_path / "train_gpt.py"
    script.write_bytes(pack.build_script(ROOT, {**TINY, "train": dataclasses.replace(TINY["train"], seed="one")}))
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "baked params: train.seed must be int, got str 'one'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
