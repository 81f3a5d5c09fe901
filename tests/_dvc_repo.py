"""A temporary git + DVC copy of this checkout at a micro config, for the end-to-end tests
(tests/test_pipeline_dvc.py, tests/test_submission.py; copy_checkout and SHRINK also
tests/test_profiles_run.py and tests/test_device_anchors.py):
helpers to run commands and DVC in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

MICRO = {
    "prepare": {"max_train_docs": 60},
    "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "xsa_last_n": 2,
              "bigram_buckets": 64, "bigram_dim": 16, "ve_dim": 16, "ve_last_n": 1, "rope_dims": 8},
    "train": {"batch_tokens": 2048, "seq_len": 128, "iterations": 24, "warmdown_iters": 8,
              "muon_momentum_warmup_steps": 8, "hessian_every": 4, "val_tokens": 8192, "log_every": 8,
              "checkpoint_every": 0},
    "quantize": {"passthrough_max_numel": 1024},
    "evaluate": {"context": 128, "stride": 64, "max_tokens": 8192},
}

# An anchor profile shrunk to a micro model: the values over it of tests/test_profiles_run.py and of
# the CPU run of bench/device_anchors.sh repro (tests/test_device_anchors.py).
SHRINK = {
    "prepare": {"max_train_docs": 60},
    "model": {"model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "rope_dims": 4, "bigram_dim": 8, "ve_dim": 8},
    "train": {"nproc_per_node": 1, "batch_tokens": 1024, "seq_len": 128, "grad_accum_steps": 1, "iterations": 6,
              "max_wallclock_seconds": 0.0, "warmdown_iters": 2, "warmup_steps": 0, "muon_momentum_warmup_steps": 2,
              "hessian_every": 2, "hessian_start_scale": 1.0, "val_tokens": 2048, "log_every": 2,
              "checkpoint_every": 0, "calibration_seqs": 4},
    "quantize": {"passthrough_max_numel": 1024},
    "compress": {"prune_slack_bytes": 0, "lzma_chunk_bytes": 0, "zstd_chunk_bytes": 0},
    "evaluate": {"context": 128, "max_tokens": 2048, "nproc_per_node": 1, "ttt_rank": 4},
}


def run(args: list[str], cwd: Path, check: bool = True, fail: bool = False) -> str:
    """Output of a command; with `check` it must succeed, with `fail` it must fail."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if fail:
        assert p.returncode != 0, f"{' '.join(args)} succeeded but must fail:\n{out[-4000:]}"
    elif check:
        assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{out[-4000:]}"
    return out


def dvc(*args: str, cwd: Path, fail: bool = False) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, fail=fail)


def set_params(repo: Path, updates: dict) -> None:
    """Update sections of the repo's params.yaml so that git is sure to see the change.

    git decides from stat data (size, mtime, ctime, inode) whether a tracked file changed before
    it reads it; a git built without nanosecond stat compares whole seconds. A one-digit edit
    (bits 6 -> 5) keeps the size and the inode, and it lands in the same second as the checkout
    a test did just before, so `git add -A` can stage nothing and `git reset --hard` can leave the
    edit in place. The mtime is therefore moved 2 s past the file's earlier one."""
    path = repo / "params.yaml"
    before = path.stat().st_mtime_ns
    doc = yaml.safe_load(path.read_text())
    for section, kv in updates.items():
        doc[section].update(kv)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    mtime = max(path.stat().st_mtime_ns, before + 2_000_000_000)
    os.utime(path, ns=(mtime, mtime))


def commit_all(repo: Path, message: str) -> None:
    """Commit every change in `repo`. `git add --renormalize` re-reads each tracked file's
    content, so a change that git's stat data hides (see `set_params`) is committed too."""
    run(["git", "add", "-A"], repo)
    run(["git", "add", "--renormalize", "."], repo)
    run(["git", "commit", "-qm", message], repo)


def copy_checkout(dst: Path) -> Path:
    """The files of this checkout (tracked, and untracked but not ignored) copied to `dst`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def micro_repo(dst: Path) -> Path:
    """A fresh git+DVC repo at `dst` holding the tracked files of this checkout, at the micro
    config, after `dvc repro` and a commit of its results."""
    copy_checkout(dst)
    set_params(dst, MICRO)
    run(["git", "init", "-q", "-b", "main"], dst)
    commit_all(dst, "micro")
    out = dvc("repro", cwd=dst)
    assert "Running stage 'evaluate'" in out
    commit_all(dst, "repro")
    return dst
