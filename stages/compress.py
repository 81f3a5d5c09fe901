"""Stage `compress`: artifacts/quant/quant.pgt -> artifacts/final/{model.ptz, code_files.json},
metrics/size.json.

Serializes the quantized tensors in the artifact layout (pgolf.artifact), compresses with lzma
and zstd, keeps the smaller (or compress.codec), counts the code files needed to rebuild and
score the model, and checks model + code against compress.cap_bytes. Over the cap the metrics
are still written (under_cap false) and the stage exits 1 saying by how much.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pgolf import artifact, config, tensorfile
from pgolf.io import OutputError, atomic_write_bytes, staged_dir, write_json

QUANT = Path("artifacts/quant/quant.pgt")
FINAL = Path("artifacts/final")
METRICS = Path("metrics/size.json")


class CompressError(ValueError):
    pass


def build(cfg: config.CompressConfig, quant: Path = QUANT, final: Path = FINAL, metrics: Path = METRICS,
          root: Path = Path(".")) -> dict:
    """Write the artifact folder and metrics/size.json; returns the size metrics."""
    artifact.check_config(cfg)
    t0 = time.perf_counter()
    tensors, header = tensorfile.load(quant, kind="quantized")
    for key in ("model", "train_seq_len", "tokenizer", "quant"):
        if key not in header["meta"]:
            raise CompressError(f"{quant}: meta lacks {key!r} (written by an older quantize stage?)")
    raw = artifact.serialize(tensors, header["meta"])
    blobs = {c: artifact.compress(raw, c, cfg) for c in artifact.CODEC_IDS}
    codec = min(blobs, key=lambda c: (len(blobs[c]), c)) if cfg.codec == "auto" else cfg.codec
    files = artifact.code_files(root)
    code = sum(f["bytes"] for f in files)
    model = len(blobs[codec])
    m = {"codec": codec, "lzma_bytes": len(blobs["lzma"]), "zstd_bytes": len(blobs["zstd"]),
         "model_bytes": model, "code_bytes": code, "total_bytes": model + code, "cap_bytes": cfg.cap_bytes,
         "under_cap": model + code <= cfg.cap_bytes, "raw_bytes": len(raw), "code_files": len(files),
         "compress_seconds": round(time.perf_counter() - t0, 3)}
    with staged_dir(final) as tmp:
        atomic_write_bytes(tmp / "model.ptz", blobs[codec])
        write_json(tmp / "code_files.json", {"files": files, "total": code})
    write_json(metrics, m)
    return m


def main() -> int:
    try:
        cfg = config.load("compress")
        m = build(cfg)
    except (config.ConfigError, tensorfile.TensorFileError, CompressError, FileNotFoundError, OutputError) as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 1
    print(f"compress: {m['codec']} {m['model_bytes']:,} bytes (lzma {m['lzma_bytes']:,}, zstd {m['zstd_bytes']:,}, "
          f"raw {m['raw_bytes']:,}) + code {m['code_bytes']:,} = {m['total_bytes']:,} of {m['cap_bytes']:,}")
    if not m["under_cap"]:
        print(f"compress: error: artifact is over the cap by {m['total_bytes'] - m['cap_bytes']:,} bytes "
              f"({m['total_bytes']:,} > compress.cap_bytes {m['cap_bytes']:,}); metrics/size.json written",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
