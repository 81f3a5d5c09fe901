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
