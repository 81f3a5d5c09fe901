"""The users' DVC workflows, end to end, in a temporary copy of the repo at a micro config.

- `dvc repro` runs the whole pipeline and writes every contract metric key;
- `dvc exp run -S quantize.<p>=...` reruns quantize -> compress -> evaluate, never prepare/train;
  setting the value back restores the earlier results from the run-cache without recomputing;
- `dvc exp run -S compress.<p>=...` reruns compress -> evaluate only (compress owns the bytes and
  the pruning; quantize is not rerun), and a forced compress.target_bytes prunes there;
- `dvc metrics diff` / `params diff` / `plots diff` between two branches show the expected keys
  and differences (checked in the --json output: DVC exits 0 even when it cannot read metrics);
  the training curves are also an image plot (plots/train.png);
- a bad param stops `dvc repro` / `dvc exp run` at the `params` gate, or at `data_check` when only
  the data can tell (model.vocab_size against the tokenizer, train.batch_tokens against the
  training tokens): no stage's outputs are deleted;
- the README's `dvc exp show` command gives a narrow table;
- the README's sharing workflow: `dvc push` to a (local-folder) remote, `dvc pull` in a second
  clone, whose `dvc repro` then reruns nothing; `dvc exp push` / `dvc exp pull` likewise.
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
from _dvc_repo import ROOT, commit_all, dvc as _dvc, micro_repo, run as _run, set_params as _set_params

pytestmark = pytest.mark.slow

CONTRACT = {
    "prepare": ["vocab_size", "train_tokens", "val_tokens", "val_bytes", "train_docs", "val_docs"],
    "train": ["steps", "train_seconds", "tokens_per_second", "world_size", "val_bpb_float", "peak_memory_mb"],
    "quant": ["int6_tensors", "passthrough_tensors", "pruned_values", "quantize_seconds", "qat_bits", "qat_bits_match"],
    "size": ["codec", "lzma_bytes", "zstd_bytes", "model_bytes", "code_bytes", "total_bytes", "cap_bytes", "under_cap",
             "pruned_values", "prune_compressions", "prune_seconds", "real_compressions"],
    "eval": ["val_loss", "val_bpb", "stride", "context", "scored_tokens", "scored_bytes", "eval_seconds"],
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh git+DVC repo holding the tracked files of this checkout, at the micro config."""
    return micro_repo(tmp_path_factory.mktemp("pipeline") / "repo")


def test_repro_writes_every_contract_metric(repo):
    for name, keys in CONTRACT.items():
        data = json.loads((repo / "metrics" / f"{name}.json").read_text())
        missing = [k for k in keys if k not in data]
        assert not missing, f"metrics/{name}.json lacks {missing}"
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0 < ev["val_bpb"] < 10
    assert "Data and pipelines are up to date" in _dvc("repro", cwd=repo)


def test_quantize_param_reruns_only_downstream_and_run_cache_restores(repo):
    before = json.loads((repo / "metrics" / "size.json").read_text())
    out = _dvc("exp", "run", "-S", "quantize.damp=0.05", cwd=repo)
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Stage 'train' didn't change, skipping" in out
    assert "Running stage 'quantize'" in out and "Running stage 'compress'" in out
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    out = _dvc("exp", "run", "-S", "quantize.damp=0.01", cwd=repo)
    assert "Stage 'quantize' is cached - skipping run" in out
    assert "Running stage" not in out
    assert json.loads((repo / "metrics" / "size.json").read_text()) == before
    _run(["git", "checkout", "-q", "--", "."], repo)
    _dvc("checkout", "-q", cwd=repo)


@pytest.mark.parametrize("setting", ["compress.zstd_level=19", "compress.target_bytes={forced}"])
def test_compress_param_reruns_only_compress_and_evaluate(repo, setting):
    size = json.loads((repo / "metrics" / "size.json").read_text())
    forced = size["total_bytes"] - 400  # below the unpruned size: compress must prune
    out = _dvc("exp", "run", "-S", setting.format(forced=forced), cwd=repo)
    for stage in ("prepare", "train", "quantize"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
        assert f"Running stage '{stage}'" not in out
    assert "Running stage 'compress'" in out and "Running stage 'evaluate'" in out
    if "target_bytes" in setting:
        new = json.loads((repo / "metrics" / "size.json").read_text())
        assert new["pruned_values"] > 0 and new["total_bytes"] <= forced and new["prune_compressions"] >= 1
    _run(["git", "checkout", "-q", "--", "."], repo)
    _dvc("checkout", "-q", cwd=repo)


def test_metrics_params_plots_diff_between_branches(repo):
    _run(["git", "checkout", "-q", "-b", "int5"], repo)
    try:
        _diff_main_and_int5(repo)
    finally:  # the later tests start from main, also when this one fails
        _run(["git", "checkout", "-q", "-f", "main"], repo)
        (repo / "params.yaml").write_text(_run(["git", "show", "main:params.yaml"], repo))  # by content
        _dvc("checkout", "-q", cwd=repo)


def _diff_main_and_int5(repo):
    _set_params(repo, {"quantize": {"bits": 5}})
    out = _dvc("repro", cwd=repo)
    assert "Stage 'train' didn't change, skipping" in out
    commit_all(repo, "int5")
    committed = _run(["git", "show", "int5:params.yaml"], repo)
    assert "bits: 5" in committed, "git did not commit the params.yaml edit (see set_params)"

    diff = json.loads(_dvc("metrics", "diff", "main", "int5", "--json", cwd=repo))
    size, ev = diff["metrics/size.json"], diff["metrics/eval.json"]
    assert size["model_bytes"]["new"] < size["model_bytes"]["old"]
    assert size["model_bytes"]["diff"] < 0
    assert ev["val_bpb"]["old"] is not None and ev["val_bpb"]["new"] is not None
    assert "metrics/train.json" not in diff  # train did not rerun: same numbers on both branches

    out = _dvc("params", "diff", "main", "int5", "--json", cwd=repo)
    params = json.loads(out)
    assert "params.yaml" in params, f"dvc params diff main int5 saw no change:\n{out}"
    changed = params["params.yaml"]["quantize.bits"]
    assert (changed["old"], changed["new"]) == (6, 5)  # DVC >= 3.6x also reports "diff": -1
    assert list(params["params.yaml"]) == ["quantize.bits"]  # nothing else changed

    plots = json.loads(_dvc("plots", "diff", "main", "int5", "--json", cwd=repo))
    charts = plots["data"]
    assert {"train_loss", "lr_scale", "tokens_per_second"} <= set(charts)
    loss = charts["train_loss"][0]
    assert loss["revisions"] == ["main", "int5"]
    rows = loss["content"]["data"]["values"]
    assert {r["rev"] for r in rows} == {"main", "int5"} and all("train_loss" in r for r in rows)


def test_training_curves_are_also_a_png_plot(repo):
    png = repo / "plots" / "train.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = json.loads(_dvc("plots", "show", "--json", cwd=repo))["data"]
    assert [p["type"] for p in shown["plots/train.png"]] == ["image"]


OUTPUTS = ("artifacts/params/model.json", "data/tokenizer/tokenizer.json", "metrics/prepare.json",
           "artifacts/train/model.pgt", "artifacts/train/hessians.pgt", "metrics/train.json", "plots/train.tsv",
           "artifacts/quant/quant.pgt", "artifacts/quant/table.json", "metrics/quant.json",
           "artifacts/final/model.ptz", "metrics/size.json", "metrics/eval.json")
BAD = {  # a value a check rejects -> the gate (and the message) that stops `dvc repro` before any output is lost
    "quantize.bits=9": ("params", "params.yaml: quantize.bits must be in the supported range [2, 8], got 9"),
    "model.vocab_size=512": ("data_check", "params.yaml: model.vocab_size is 512 but data/tokenizer/tokenizer.json "
                                           "says the tokenizer has 1024 tokens; set model.vocab_size to 1024"),
    "evaluate.max_tokens=100": ("params", "params.yaml: evaluate.max_tokens must be 0 (all) or >= evaluate.context "
                                          "(128), one window, got 100"),
    "train.batch_tokens=16777216": ("data_check", "params.yaml: train.batch_tokens (16777216) must be below the "),
}


@pytest.mark.parametrize("how", ["repro", "exp run"])
@pytest.mark.parametrize("setting", list(BAD))
def test_bad_param_stops_at_a_gate_and_loses_no_output(repo, how, setting):
    """Every output of every stage (the train stage's uncached metrics and plots included) is
    byte-identical after a value that a check rejects, whether it needs the data or not."""
    before = {p: (repo / p).read_bytes() for p in OUTPUTS}
    params = (repo / "params.yaml").read_text()
    gate, message = BAD[setting]
    key, value = setting.split("=")
    if how == "repro":
        section, name = key.split(".")
        _set_params(repo, {section: {name: int(value)}})
        out = _dvc("repro", cwd=repo, fail=True)
    else:
        out = _dvc("exp", "run", "-S", setting, cwd=repo, fail=True)
    assert f"{gate}: error: {message}" in out
    ran = [s for s in ("prepare", "data_check", "train", "quantize", "compress", "evaluate") if f"Running stage '{s}'" in out]
    assert ran == (["data_check"] if gate == "data_check" else []), ran
    (repo / "params.yaml").write_text(params)  # (git checkout can miss it: DVC restores the mtime)
    assert {p: (repo / p).read_bytes() for p in OUTPUTS if p != "artifacts/params/model.json"} == \
        {p: v for p, v in before.items() if p != "artifacts/params/model.json"}
    out = _dvc("repro", cwd=repo)  # the gate reruns (or comes from the run-cache); nothing else
    assert "Running stage" not in out.replace("Running stage 'params'", ""), out
    assert {p: (repo / p).read_bytes() for p in OUTPUTS} == before
    assert "Data and pipelines are up to date" in _dvc("repro", cwd=repo)


def _readme_command(prefix: str) -> list[str]:
    """The README's one-line command that starts with `prefix`, split as a shell would."""
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip().startswith(prefix)]
    assert lines, f"README.md shows no `{prefix} ...` command"
    return shlex.split(lines[0])


def test_readme_exp_show_command_gives_a_readable_table(repo):
    _dvc("exp", "run", "-S", "quantize.damp=0.05", "-n", "damp05", cwd=repo)  # from the run-cache
    _run(["git", "reset", "-q", "--hard"], repo)
    _dvc("checkout", "-q", cwd=repo)
    cmd = _readme_command("dvc exp show --only-changed")
    rows = list(csv.reader(_dvc(*cmd[1:], "--csv", "--no-pager", cwd=repo).splitlines()))
    header = rows[0]
    assert len(rows) >= 4  # workspace, main, the experiment(s)
    assert {"Experiment", "val_bpb", "total_bytes", "under_cap"} <= set(header)
    assert "quantize.damp" in header  # the param the experiment changed ...
    assert "quantize.bits" not in header and "train.seq_len" not in header  # ... and none that it did not
    assert len(header) <= 10, header  # not ~300 columns


def test_remote_push_pull_second_clone_reruns_nothing(repo, tmp_path):
    readme = (ROOT / "README.md").read_text()
    for command in ("dvc remote add -d", "dvc push", "dvc pull", "dvc exp push origin", "dvc exp pull origin"):
        assert command in readme, f"README.md does not document `{command}`"
    origin, storage, clone = tmp_path / "origin.git", tmp_path / "storage", tmp_path / "clone"
    _run(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    _dvc("remote", "add", "-d", "storage", str(storage), cwd=repo)
    _run(["git", "add", ".dvc/config"], repo)
    _run(["git", "commit", "-qm", "dvc remote"], repo)
    _run(["git", "remote", "add", "origin", str(origin)], repo)
    _run(["git", "push", "-q", "origin", "main"], repo)
    _dvc("push", cwd=repo)

    _run(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], tmp_path)
    _dvc("pull", cwd=clone)
    out = _dvc("repro", cwd=clone)
    assert "Running stage" not in out and "Data and pipelines are up to date" in out, out
    for name in CONTRACT:
        rel = f"metrics/{name}.json"
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes()
    assert (clone / "artifacts/final/model.ptz").read_bytes() == (repo / "artifacts/final/model.ptz").read_bytes()

    _dvc("exp", "run", "-S", "quantize.damp=0.05", "-n", "shared", cwd=repo)
    want = (repo / "metrics/size.json").read_bytes()
    _dvc("exp", "push", "origin", "shared", cwd=repo)
    _dvc("exp", "pull", "origin", "shared", cwd=clone)
    _dvc("exp", "apply", "shared", cwd=clone)
    assert (clone / "metrics/size.json").read_bytes() == want
    out = _dvc("repro", cwd=clone)
    assert "Running stage" not in out, out
    _run(["git", "reset", "-q", "--hard"], repo)
    _dvc("checkout", "-q", cwd=repo)
