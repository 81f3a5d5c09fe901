"""Download the challenge's published FineWeb export (pre-tokenized sp1024 shards + tokenizer).

This module owns the one network step of the project, kept outside the DVC stages:

    pgolf fineweb --train-shards 8 --out data/fineweb10B_sp1024

fetches from the Hugging Face dataset repo `willdepueoai/parameter-golf` (recipe-spec §1.1):

* `datasets/manifest.json` (shard counts, tokenizer file names), when the repo has it;
* `datasets/datasets/fineweb10B_sp1024/fineweb_val_%06d.bin` (all of them),
* `datasets/datasets/fineweb10B_sp1024/fineweb_train_%06d.bin` (the first N),
* `datasets/tokenizers/fineweb_1024_bpe.model`,

and puts them side by side in `--out`, ready for `prepare.source: fineweb` with
`prepare.corpus: <out>` and `prepare.tokenizer: <out>/fineweb_1024_bpe.model`. Files are
hard-linked from the Hugging Face cache (copied when linking fails), existing files are kept,
and every shard is checked with `pgolf.shared.shards.read_shard_header`. `huggingface_hub` is an
optional dependency (`pip install pgolf[fineweb]`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from pgolf import config
from pgolf.shared import shards

REMOTE_ROOT = "datasets"  # subfolder of the dataset repo holding the export
DATASET = "fineweb10B_sp1024"
TOKENIZER_FILE = "fineweb_1024_bpe.model"
MANIFEST = f"{REMOTE_ROOT}/manifest.json"
SHARD_RE = re.compile(r"fineweb_(train|val)_(\d{6})\.bin")

# downloader(repo_id, remote_path) -> local file path (FileNotFoundError if absent);  lister(repo_id) -> every file path in the repo
Downloader = Callable[[str, str], Path]
Lister = Callable[[str], list]


class DownloadError(RuntimeError):
    """The export cannot be fetched or is not what we expect."""


def shard_remote(split: str, index: int) -> str:
    return f"{REMOTE_ROOT}/datasets/{DATASET}/fineweb_{split}_{index:06d}.bin"


def _hf_downloader(repo_id: str, remote_path: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError("downloading the FineWeb export needs huggingface_hub: pip install 'huggingface_hub>=0.24' "
                            "(or pip install -e .[fineweb])") from None
    parent, name = remote_path.rsplit("/", 1)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=name, subfolder=parent, repo_type="dataset"))
    except Exception as e:  # huggingface_hub's EntryNotFoundError: a file the repo does not have
        if "EntryNotFound" in type(e).__name__:
            raise FileNotFoundError(f"{repo_id}: no file {remote_path}") from None
        raise


def _hf_lister(repo_id: str) -> list:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise DownloadError("listing the FineWeb export needs huggingface_hub: pip install 'huggingface_hub>=0.24'") from None
    return list(HfApi().list_repo_files(repo_id, repo_type="dataset"))


def plan(train_shards: int, manifest: dict | None, repo_files: list | None) -> list[str]:
    """Remote paths to fetch: all val shards, the first `train_shards` train shards, the tokenizer."""
    if train_shards < 0:
        raise DownloadError(f"--train-shards must be >= 0, got {train_shards}")
    tokenizer = f"{REMOTE_ROOT}/tokenizers/{TOKENIZER_FILE}"
    if manifest is not None:
        entry = next((d for d in manifest.get("datasets", []) if d.get("name") == DATASET), None)
        if entry is None:
            raise DownloadError(f"{MANIFEST}: no dataset named {DATASET}")
        stats = entry.get("stats") or {}
        n_val, n_train = int(stats.get("files_val", 0)), int(stats.get("files_train", 0))
        tok_entry = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), {})
        if tok_entry.get("model_path"):
            tokenizer = f"{REMOTE_ROOT}/{tok_entry['model_path']}"
    elif repo_files is not None:
        found = {"val": [], "train": []}
        prefix = f"{REMOTE_ROOT}/datasets/{DATASET}/"
        for f in repo_files:
            m = SHARD_RE.fullmatch(f[len(prefix):]) if f.startswith(prefix) else None
            if m:
                found[m.group(1)].append(int(m.group(2)))
        n_val, n_train = len(found["val"]), len(found["train"])
    else:
        raise DownloadError("need the manifest or the repo file list to know the shard counts")
    if n_val == 0:
        raise DownloadError(f"the export lists no validation shards for {DATASET}")
    if train_shards > n_train:
        raise DownloadError(f"{DATASET} has {n_train} training shards, --train-shards asked for {train_shards}")
    return ([shard_remote("val", i) for i in range(n_val)]
            + [shard_remote("train", i) for i in range(train_shards)] + [tokenizer])


def _place(src: Path, dst: Path) -> None:
    src = src.resolve(strict=True)  # HF cache entries are symlinks to blobs
    tmp = dst.with_name(f".{dst.name}.part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def download(train_shards: int, out: str | Path, repo: str = "willdepueoai/parameter-golf",
             downloader: Downloader | None = None, lister: Lister | None = None) -> list[Path]:
    """Fetch the export into `out` (flat); returns the local paths, in plan order."""
    downloader = downloader or _hf_downloader
    lister = lister or _hf_lister
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, files = None, None
    try:
        manifest = json.loads(Path(downloader(repo, MANIFEST)).read_text())
    except FileNotFoundError as e:  # no manifest in the repo: list its files instead
        print(f"fineweb: {MANIFEST} not available ({e}); listing the repository", file=sys.stderr)
        files = lister(repo)
    local = []
    for remote in plan(train_shards, manifest, files):
        dst = out / remote.rsplit("/", 1)[1]
        if not dst.exists():
            _place(Path(downloader(repo, remote)), dst)
        if dst.suffix == ".bin":
            shards.read_shard_header(dst)
        local.append(dst)
    return local


def main(argv: list | None = None) -> int:
    try:
        defaults = config.load("prepare") if Path("params.yaml").exists() else config.PrepareConfig()
    except config.ConfigError as e:
        print(f"fineweb: error: {e}", file=sys.stderr)
        return 1
    ap = argparse.ArgumentParser(prog="pgolf fineweb", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-shards", type=int, default=defaults.fineweb_train_shards,
                    help="training shards to fetch (100M tokens each; default: params.yaml's "
                         "prepare.fineweb_train_shards, else the record profile's, %(default)s)")
    ap.add_argument("--out", default=defaults.fineweb_dir, help="destination folder")
    ap.add_argument("--repo", default=defaults.fineweb_repo, help="Hugging Face dataset repo")
    args = ap.parse_args(argv)
    try:
        paths = download(args.train_shards, args.out, args.repo)
    except (DownloadError, shards.ShardError) as e:
        print(f"fineweb: error: {e}", file=sys.stderr)
        return 1
    print(f"fineweb: {len(paths)} files in {args.out}; set prepare.source: fineweb, prepare.corpus: {args.out}, "
          f"prepare.tokenizer: {Path(args.out) / TOKENIZER_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
