"""What the README promises a new user, checked against the repo (the commands themselves run in
test_pipeline_dvc.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_says_a_fresh_clones_metrics_can_differ_in_the_last_digits():
    text = " ".join(README.split())
    assert re.search(r"fresh clone that reruns `dvc repro` .* metrics that can differ from the committed ones "
                     r"in the last digits", text)
    assert "not bit-identical across CPU models" in text


def test_quickstart_ends_with_one_summary():
    quick = README[README.index("## Quickstart"):README.index("## The stages")]
    assert quick.count("pgolf summary\n") == 1  # the output block, printed once by the closing command
    assert "dvc repro && python -m pgolf.summary" in quick


def test_stage_table_lists_every_dvc_stage():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    table = README[README.index("## The stages"):README.index("## Everyday workflows")]
    for name in stages:
        assert f"`python -m stages.{name}`" in table, name


def test_cited_code_paths_and_names_exist():
    """Every pgolf/... path and pgolf.x.y name the README cites is in the tree (they move with the
    folder layout): a path is a file or folder, a dotted name a module or an attribute of one."""
    import importlib

    paths = set(re.findall(r"(?<![\w/.])((?:pgolf|stages|tests|scripts|profiles)/[\w./-]*\w)", README))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
    names = set(re.findall(r"(?<![\w/.])pgolf(?:\.\w+)+", README))
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"README cites {name}: {'.'.join(parts[:i])} has no {attr}"
            obj = getattr(obj, attr)
