"""The compress stage: quantized tensors -> the submission artifact, the packed script, the cap check.

This module owns `artifacts/final/` (model.ptz, train_gpt.py, code_files.json) and
`metrics/size.json`. It serializes the quantized tensors in the artifact layout (pgolf.artifact),
compresses with lzma and zstd (and brotli with compress.brotli) and keeps the smallest (or
compress.codec). Code bytes are the bytes of the packed `train_gpt.py` (pgolf.pack), as the
challenge counts them: model + that script against compress.cap_bytes. The older count (the raw
evaluation files of pgolf.artifact.CODE_FILES) stays as the extra key `code_bytes_eval_files_raw`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from pgolf import artifact, tensorfile
from pgolf.config import CompressConfig
from pgolf.io import atomic_write_bytes, file_sha256, staged_dir, write_json

QUANT = Path("artifacts/quant/quant.pgt")
FINAL = Path("artifacts/final")
METRICS = Path("metrics/size.json")
SCRIPT = "train_gpt.py"


class CompressError(ValueError):
    pass


def build(cfg: CompressConfig, script: bytes, quant: Path = QUANT, final: Path = FINAL, metrics: Path = METRICS,
          eval_files: list[dict] | None = None) -> dict:
    """Write the artifact folder (model.ptz, the packed script, code_files.json) and metrics/size.json.

    `script` is the packed train_gpt.py whose bytes count as code; `eval_files` the raw
    evaluation files ([{"path", "bytes"}], pgolf.artifact.code_files) recorded as the extra count.
    """
    artifact.check_config(cfg)
    t0 = time.perf_counter()
    tensors, header = tensorfile.load(quant, kind="quantized")
    for key in ("model", "train_seq_len", "tokenizer", "quant"):
        if key not in header["meta"]:
            raise CompressError(f"{quant}: meta lacks {key!r} (written by an older quantize stage?)")
    raw = artifact.serialize(tensors, header["meta"], cfg.layout)
    blobs = artifact.compress_all(raw, cfg)
    codec = min(blobs, key=lambda c: (len(blobs[c]), c)) if cfg.codec == "auto" else cfg.codec
    model, code = len(blobs[codec]), len(script)
    m = {"codec": codec, **{f"{c}_bytes": len(b) for c, b in blobs.items()}, "model_bytes": model,
         "code_bytes": code, "total_bytes": model + code, "cap_bytes": cfg.cap_bytes,
         "under_cap": model + code <= cfg.cap_bytes, "raw_bytes": len(raw), "code_count": f"packed {SCRIPT}",
         "code_sha256": hashlib.sha256(script).hexdigest()}
    listing = {"script": SCRIPT, "bytes": code, "sha256": m["code_sha256"]}
    if eval_files is not None:
        m["code_bytes_eval_files_raw"] = sum(f["bytes"] for f in eval_files)
        m["code_files"] = len(eval_files)
        listing["eval_files_raw"] = {"files": eval_files, "total": m["code_bytes_eval_files_raw"]}
    m["compress_seconds"] = round(time.perf_counter() - t0, 3)
    with staged_dir(final) as tmp:
        atomic_write_bytes(tmp / "model.ptz", blobs[codec])
        atomic_write_bytes(tmp / SCRIPT, script)
        write_json(tmp / "code_files.json", listing)
    m["model_sha256"] = file_sha256(Path(final) / "model.ptz")
    write_json(metrics, m)
    return m


def over_cap_message(m: dict) -> str:
    return (f"artifact is over the cap by {m['total_bytes'] - m['cap_bytes']:,} bytes ({m['total_bytes']:,} = model "
            f"{m['model_bytes']:,} + packed code {m['code_bytes']:,} > compress.cap_bytes {m['cap_bytes']:,})")
