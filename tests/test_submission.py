"""The submission end to end, in a temporary git + DVC repo at the micro config (tests/_dvc_repo.py):

- export the finished run, lay out a fresh folder as the challenge's (the exported train_gpt.py,
  ./data/datasets/fineweb10B_sp1024/ with the run's shards, ./data/tokenizers/ with its tokenizer),
  run `python train_gpt.py` there on CPU and get the pipeline's val_bpb and artifact bytes. The
  tolerance is zero: the same code and params on the same CPU give bit-identical weights, so the
  artifact's sha256, the byte counts and val_bpb must be equal;
- export refuses the run once params.yaml changed after it;
- the same script with train.nproc_per_node = 2 relaunches itself under torchrun (2 CPU ranks);
- N seeds as DVC experiments, summarised by `pgolf seeds` from `dvc exp show`, with
  every seed's train log, and exported with the run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _dvc_repo import dvc, micro_repo, run
from pgolf.compress import pack
from pgolf.shared import checked
from pgolf.submit import export, seeds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return micro_repo(tmp_path_factory.mktemp("submission") / "repo")


def _metrics(root: Path, name: str) -> dict:
    return json.loads((root / "metrics" / f"{name}.json").read_text())


def challenge_folder(dst: Path, records: Path | None, repo: Path) -> Path:
    """A fresh folder laid out like the challenge's, holding the run's data and the exported script
    (when `records` is given)."""
    shards = dst / "data" / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    for p in (repo / "data" / "shards").glob("fineweb_*.bin"):
        shutil.copy2(p, shards / p.name)
    (dst / "data" / "tokenizers").mkdir()
    shutil.copy2(repo / "data" / "tokenizer" / "tokenizer.model", dst / "data" / "tokenizers" / "fineweb_1024_bpe.model")
    if records is not None:
        shutil.copy2(records / "train_gpt.py", dst / "train_gpt.py")
    return dst


def test_exported_script_reproduces_the_run_in_the_challenge_layout(repo, tmp_path):
    records = export.export(repo, tmp_path / "records" / "micro", "micro", "t", "t", "end-to-end test")
    folder = challenge_folder(tmp_path / "challenge", records, repo)
    p = subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, capture_output=True, text=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    out = folder / "pgolf_run"
    ev, size = _metrics(out, "eval"), _metrics(out, "size")
    want_ev, want_size = _metrics(repo, "eval"), _metrics(repo, "size")
    assert (out / "artifacts/final/model.ptz").read_bytes() == (repo / "artifacts/final/model.ptz").read_bytes()
    assert ev["artifact_sha256"] == want_ev["artifact_sha256"]
    assert (ev["val_bpb"], ev["val_loss"], ev["scored_tokens"]) == (want_ev["val_bpb"], want_ev["val_loss"],
                                                                    want_ev["scored_tokens"])
    script = (folder / "train_gpt.py").stat().st_size
    assert size["code_bytes"] == script == want_size["code_bytes"]
    assert (size["model_bytes"], size["total_bytes"]) == (want_size["model_bytes"], want_size["total_bytes"])
    log = p.stdout
    assert "step:24/24 val_loss:" in log and f"Code size: {script} bytes" in log
    assert f"Total submission size int6+{size['codec']}: {size['total_bytes']} bytes" in log
    assert f"final_int6_sliding_window_exact val_loss:{ev['val_loss']:.8f} val_bpb:{ev['val_bpb']:.8f}" in log
    assert (out / "train_gpt.log").read_text().count("\n") >= 6
    assert not list(folder.glob("*.tmp")) and sorted(p.name for p in folder.iterdir()) == ["data", "pgolf_run",
                                                                                           "train_gpt.py"]


def test_export_refuses_a_run_whose_params_changed(repo, tmp_path):
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("iterations: 24", "iterations: 25"))
    try:
        with pytest.raises(export.ExportError, match=r"params.yaml: train.iterations is 25 but the run was made "
                                                     r"with 24 \(dvc.lock, stage train\)"):
            export.export(repo, tmp_path / "rec", "n", "a", "g", "")
        assert not (tmp_path / "rec").exists()
    finally:
        run(["git", "checkout", "-q", "--", "params.yaml"], repo)


def test_seeds_as_dvc_experiments_then_summary_and_export(repo, tmp_path):
    for seed in (7, 8):
        dvc("exp", "run", "-S", f"train.seed={seed}", "-n", f"seed{seed}", cwd=repo)
    run(["git", "checkout", "-q", "--", "."], repo)
    dvc("checkout", "-q", cwd=repo)
    runs = seeds.runs_from_exp_show(seeds.exp_show(repo))
    assert sorted((r.name, r.seed) for r in runs) == [("seed7", 7), ("seed8", 8)]
    base = max(r.val_bpb for r in runs) + 1.0  # a much worse baseline: the improvement is clear
    out = run([sys.executable, "-m", "pgolf", "seeds", "--baseline-bpb", str(base), "--out", str(tmp_path / "seeds")],
              repo)
    assert "seeds: 2 runs" in out
    summary = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert summary["n"] == 2 and summary["improvement_nats_mean"] > 1.0
    assert "step:24/24" in (tmp_path / "seeds" / "train_seed7.log").read_text()
    records = export.export(repo, tmp_path / "rec", "n", "a", "g", "", seeds=tmp_path / "seeds")
    assert (records / "train_seed8.log").exists() and (records / "seeds.json").exists()
    one = run([sys.executable, "-m", "pgolf", "seeds", "--baseline-bpb", "9", "--exp", "seed7"], repo, check=False)
    assert "seeds: error: 1 run(s) with metrics/eval.json; a seed summary needs at least 2" in one


def test_script_relaunches_itself_under_torchrun_with_two_ranks(repo, tmp_path):
    """train.nproc_per_node = 2 baked in, started with plain python: the script relaunches itself
    through torchrun (gloo on CPU); rank 0 prepares, quantizes and compresses, both ranks train and
    evaluate, and only rank 0 prints."""
    cfgs = checked.read_all(pack.BAKED_SECTIONS, repo)  # the micro run's checked values
    cfgs["train"] = dataclasses.replace(cfgs["train"], nproc_per_node=2)
    folder = challenge_folder(tmp_path / "challenge", None, repo)
    (folder / "train_gpt.py").write_bytes(pack.build_script(repo, cfgs))
    p = subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, capture_output=True, text=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    out = folder / "pgolf_run"
    assert _metrics(out, "train")["world_size"] == 2 and _metrics(out, "eval")["world_size"] == 2
    assert _metrics(out, "size")["code_bytes"] == (folder / "train_gpt.py").stat().st_size
    assert abs(_metrics(out, "eval")["val_bpb"] - _metrics(repo, "eval")["val_bpb"]) < 0.05
    assert p.stdout.count("Total submission size") == 1 and p.stdout.count("final_int6_sliding_window_exact") == 1
