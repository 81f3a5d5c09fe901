"""What the README promises a new user, checked against the repo (the commands themselves run in
test_pipeline_dvc.py), and what docs/ owes its figures: the JSON they come from."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
JSON_RE = re.compile(r"bench/results/([\w.-]+\.json)")
# a figure: a decimal (2.7237, 1.212) or a number with thousands separators (535,498)
FIGURE_RE = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])|(?<![\w,])\d{1,3}(?:,\d{3})+(?![\w,])")


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end)]


def test_readme_is_a_users_guide_not_a_lab_notebook():
    assert len(README.splitlines()) <= 450


def test_says_a_fresh_clones_metrics_can_differ_in_the_last_digits():
    text = " ".join(README.split())
    assert re.search(r"fresh clone that reruns `dvc repro` .* metrics that can differ from the committed ones "
                     r"in the last digits", text)
    assert "not bit-identical across CPU models" in text


def test_quickstart_is_two_commands_ending_with_one_summary():
    quick = _section(README, "## Quickstart", "## The stages")
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert [b.strip() for b in blocks] == [
        "bash scripts/setup.sh && . .venv/bin/activate && dvc repro && pgolf summary",
        "bash scripts/setup.sh dev && .venv/bin/python -m pytest -q",
    ]
    # the output block, printed once by the closing command
    assert [ln for ln in quick.splitlines() if ln == "pgolf summary"] == ["pgolf summary"]
    assert "quickstart_cpu.json" in quick  # the figures name where they come from


def test_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh dev && .venv/bin/python -m pytest -q" in ci


def test_stage_table_lists_every_dvc_stage():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    table = _section(README, "## The stages", "## Everyday workflows")
    for name in stages:
        assert f"`python -m stages.{name}`" in table, name


def test_cited_code_paths_and_names_exist():
    """Every pgolf/... path and pgolf.x.y name the README cites is in the tree (they move with the
    folder layout): a path is a file or folder, a dotted name a module or an attribute of one."""
    import importlib

    paths = set(re.findall(r"(?<![\w/.])((?:pgolf|stages|tests|scripts|profiles|docs)/[\w./-]*\w)", README))
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


def test_readme_links_every_doc():
    assert DOCS, "docs/ holds the measurements the README leaves out"
    for doc in DOCS:
        assert f"docs/{doc.name}" in README, f"README does not point to docs/{doc.name}"


def test_results_table_names_the_json_of_every_figure():
    results = _section(README, "## Results", "## Development")
    rows = [ln for ln in results.splitlines() if ln.startswith("|") and not ln.startswith("|---")][1:]
    assert rows, "no results table"
    for row in rows:
        names = JSON_RE.findall(row)
        assert names, f"results row names no bench/results/*.json: {row}"
        for name in names:
            assert (ROOT / "bench" / "results" / name).is_file(), name


def test_every_bench_json_cited_exists():
    """Outside code blocks (where `--out bench/results/X.json` is where a rerun would write)."""
    for path, text in [(ROOT / "README.md", README)] + [(d, d.read_text()) for d in DOCS]:
        for name in JSON_RE.findall(re.sub(r"```.*?```", "", text, flags=re.S)):
            assert (ROOT / "bench" / "results" / name).is_file(), f"{path.name} cites bench/results/{name}"


def test_docs_with_figures_name_their_json():
    for doc in DOCS:
        text = doc.read_text()
        if FIGURE_RE.search(text):
            assert JSON_RE.search(text), f"docs/{doc.name} cites figures but names no bench/results/*.json"


def test_docs_links_resolve():
    """Relative links between docs (and their #anchors, GitHub's slugs) lead somewhere."""
    def slugs(text: str) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", text, re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    for doc in DOCS + [ROOT / "README.md"]:
        text = doc.read_text()
        for target, anchor in re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#([\w-]+))?\)", text):
            path = (doc.parent / target) if doc.parent.name == "docs" else ROOT / target
            assert path.is_file(), f"{doc.name} links {target}"
            if anchor:
                assert anchor in slugs(path.read_text()), f"{doc.name} links {target}#{anchor}"
