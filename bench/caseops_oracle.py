"""The CaseOps oracle: pgolf's prepare against PR #2135's own `prepare_caseops_data.py`, token for token.

    python -m bench.caseops_oracle [--proxy-docs 1500] [--anchor-python PY] [--out bench/results/caseops_oracle.json]

Both tools get the same documents: as validation, the 901 FineWeb validation documents and the
first `--proxy-val-docs` documents of the proxy corpus's `docs-001.jsonl.zst` (raw text with
newlines and runs of spaces, where the sidecar's original bytes differ most from the normalized
text; here only to test the sidecar, never to report a score); as training text the next
`--proxy-docs` documents of that file (the anchor takes the first `--val-docs` documents of its
one JSONL as validation, the rest as training). The anchor runs with the SP8192 CaseOps model of
its record folder; pgolf's prepare runs with `text_transform: caseops` and the project's copy of
that model, 10,000,000 tokens per shard like the anchor. The comparison: the validation tokens, the validation byte sidecar and the
training tokens, every entry, and each output file's sha256 (same shard size, so the files
should be byte-identical).

The anchor calls sentencepiece's `encode_as_immutable_proto`, gone since sentencepiece 0.2.2: in
this process it runs with the stand-in of tests/anchor_stubs/sp_immutable_proto.py. With
`--anchor-python` (a Python whose sentencepiece is 0.2.1, e.g. a venv made with
`pip install sentencepiece==0.2.1 numpy`) it also runs there, unpatched, as a subprocess, and
that run is compared too; it checks the stand-in. Writes the JSON (tokens compared, mismatches,
seconds per tool). Needs ../shared (the anchor and the data); CPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ANCHOR = SHARED / "anchors" / "pr2135"
ANCHOR_SCRIPT = ANCHOR / "prepare_caseops_data.py"
ANCHOR_MODEL = ANCHOR / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
MODEL = REPO / "data" / "tokenizer_src" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
VAL_DOCS = SHARED / "data" / "fineweb_val_first901" / "docs.jsonl.zst"
PROXY = SHARED / "data" / "proxy_corpus" / "docs-001.jsonl.zst"
ANCHOR_SUBDIR = Path("datasets") / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"  # under --out
SHARD_TOKENS = 10_000_000  # the anchor's SHARD_TOKENS
STUBS = REPO / "tests" / "anchor_stubs"


def write_jsonl(path: Path, texts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def shim():
    """tests/anchor_stubs/sp_immutable_proto (the encode_as_immutable_proto stand-in), imported."""
    if str(STUBS) not in sys.path:
        sys.path.insert(0, str(STUBS))
    import sp_immutable_proto

    return sp_immutable_proto


def load_anchor():
    """prepare_caseops_data.py imported as a module (it runs only with encode_as_immutable_proto:
    sentencepiece <= 0.2.1, or the stand-in of `shim()` installed)."""
    spec = importlib.util.spec_from_file_location("anchor_pr2135_prepare_caseops_data", ANCHOR_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_anchor(module, docs_jsonl: Path, out: Path, val_docs: int) -> Path:
    """The anchor's main() in this process (its prints swallowed) -> its shard folder."""
    argv = ["prepare_caseops_data.py", "--docs", str(docs_jsonl), "--out", str(out), "--sp", str(ANCHOR_MODEL),
            "--val-docs", str(val_docs)]
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module.main()
    finally:
        sys.argv = saved
    return out / ANCHOR_SUBDIR


def run_anchor_subprocess(python: str, docs_jsonl: Path, out: Path, val_docs: int) -> Path:
    """The anchor script run unchanged by another Python (sentencepiece 0.2.1) -> its shard folder."""
    subprocess.run([python, str(ANCHOR_SCRIPT), "--docs", str(docs_jsonl), "--out", str(out), "--sp",
                    str(ANCHOR_MODEL), "--val-docs", str(val_docs)], check=True, capture_output=True)
    return out / ANCHOR_SUBDIR


def run_pgolf(root: Path, val_jsonl: Path, train_jsonl: Path, workers: int = 1, model: Path = MODEL) -> Path:
    """pgolf's prepare (text_transform caseops) under `root` -> its shard folder."""
    from pgolf import config
    from pgolf.prepare import prepare
    from pgolf.shared import layout

    cfg = config.from_dict("prepare", dict(
        source="local", corpus=str(train_jsonl), val_source=str(val_jsonl), val_docs=0, tokenizer=str(model),
        vocab_size=8192, shard_tokens=SHARD_TOKENS, workers=workers, text_transform="caseops"))
    with contextlib.redirect_stderr(io.StringIO()):
        prepare.run(cfg, root)
    return root / layout.SHARDS


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stream(folder: Path, pattern: str) -> np.ndarray:
    from pgolf.shared import shards

    files = sorted(folder.glob(pattern))
    return np.concatenate([shards.read_shard(p) for p in files]) if files else np.zeros(0, np.uint16)


def compare(ours: Path, theirs: Path, names: tuple[str, str] = ("pgolf", "anchor")) -> dict:
    """Entry-by-entry comparison of two shard folders: val tokens, val byte sidecar, train tokens."""
    out = {}
    x, y = names
    for key, pattern in (("val_tokens", "fineweb_val_[0-9]*.bin"), ("val_bytes", "fineweb_val_bytes_*.bin"),
                         ("train_tokens", "fineweb_train_*.bin")):
        a, b = _stream(ours, pattern), _stream(theirs, pattern)
        n = min(a.size, b.size)
        mism = int(np.count_nonzero(a[:n] != b[:n])) + abs(int(a.size) - int(b.size))
        first = np.flatnonzero(a[:n] != b[:n])
        out[key] = {"compared": int(n), x: int(a.size), y: int(b.size), "mismatches": mism,
                    "first_mismatch": int(first[0]) if first.size else None, f"sum_{x}": int(a.astype(np.int64).sum()),
                    f"sum_{y}": int(b.astype(np.int64).sum())}
    names = sorted(p.name for p in theirs.glob("fineweb_*.bin"))
    out["files_identical"] = {n: (ours / n).is_file() and _sha(ours / n) == _sha(theirs / n) for n in names}
    return out


def oracle(val_texts: list[str], train_texts: list[str], work: Path, anchor_python: str | None = None,
           workers: int = 1) -> dict:
    """Run the tools on the same documents under `work`; the comparison and the seconds of each."""
    both = write_jsonl(work / "docs.jsonl", val_texts + train_texts)
    val = write_jsonl(work / "val.jsonl", val_texts)
    train = write_jsonl(work / "train.jsonl", train_texts)
    import pgolf.prepare.prepare  # noqa: F401  (imports, torch's included, outside the timings)

    for sub in ("anchor", "pgolf", "anchor_sp021"):
        shutil.rmtree(work / sub, ignore_errors=True)
    t0 = time.perf_counter()
    module = load_anchor()
    anchor_dir = run_anchor(module, both, work / "anchor", len(val_texts))
    t1 = time.perf_counter()
    ours = run_pgolf(work / "pgolf", val, train, workers)
    t2 = time.perf_counter()
    res = {"docs": {"val": len(val_texts), "train": len(train_texts)},
           "seconds": {"anchor_shim_sp023": round(t1 - t0, 3), f"pgolf_prepare_workers{workers}": round(t2 - t1, 3)},
           "pgolf_vs_anchor": compare(ours, anchor_dir)}
    if anchor_python:
        t3 = time.perf_counter()
        real = run_anchor_subprocess(anchor_python, both, work / "anchor_sp021", len(val_texts))
        res["seconds"]["anchor_sp021_subprocess"] = round(time.perf_counter() - t3, 3)
        res["anchor_shim_vs_anchor_sp021"] = compare(anchor_dir, real, ("anchor_shim", "anchor_sp021"))
        res["pgolf_vs_anchor_sp021"] = compare(ours, real, ("pgolf", "anchor_sp021"))
    return res


def mismatches(res: dict) -> int:
    """Total mismatching entries over every comparison of an oracle result."""
    return sum(v["mismatches"] for k, c in res.items() if "_vs_" in k for name, v in c.items() if name != "files_identical")


def read_texts(path: Path, limit: int = 0) -> list[str]:
    from pgolf.prepare.corpus import iter_documents

    it = iter_documents(path)
    return list(islice(it, limit)) if limit else list(it)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy-val-docs", type=int, default=500, help="proxy-corpus documents added to the validation set")
    ap.add_argument("--proxy-docs", type=int, default=1500, help="training documents from the proxy corpus")
    ap.add_argument("--anchor-python", default="", help="a Python with sentencepiece 0.2.1 (also run the anchor there)")
    ap.add_argument("--workers", type=int, default=1, help="pgolf prepare's worker processes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/caseops_oracle"), help="scratch folder")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "caseops_oracle.json")
    a = ap.parse_args(argv)
    if not ANCHOR_SCRIPT.is_file():
        raise SystemExit(f"caseops_oracle: error: {ANCHOR_SCRIPT} is absent (the anchors live in ../shared)")
    import sentencepiece

    shim().install()
    proxy = read_texts(PROXY, a.proxy_val_docs + a.proxy_docs)
    val_texts = read_texts(VAL_DOCS) + proxy[:a.proxy_val_docs]
    train_texts = proxy[a.proxy_val_docs:]
    res = oracle(val_texts, train_texts, a.work, a.anchor_python or None, a.workers)
    proxy_name = PROXY.relative_to(SHARED.parent)
    res = {"what": "pgolf prepare (text_transform caseops) vs PR #2135 prepare_caseops_data.py, entry by entry",
           "val_source": f"{VAL_DOCS.relative_to(SHARED.parent)} (901 docs) + {proxy_name} docs 0-{a.proxy_val_docs - 1}",
           "train_source": f"{proxy_name} docs {a.proxy_val_docs}-{a.proxy_val_docs + a.proxy_docs - 1}",
           "sentencepiece": sentencepiece.__version__, "model_sha256": _sha(MODEL),
           "mismatches": 0, **res}
    res["mismatches"] = mismatches(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({"mismatches": res["mismatches"], "seconds": res["seconds"],
                      "val_tokens": res["pgolf_vs_anchor"]["val_tokens"]["compared"],
                      "train_tokens": res["pgolf_vs_anchor"]["train_tokens"]["compared"]}))
    return 0 if res["mismatches"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
