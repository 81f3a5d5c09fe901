"""Artifact bytes per layout (compress.layout flat / grouped) and codec (lzma-9, zstd-22, brotli-11)
for a quantized file, e.g. the tiny pipeline's. The row "grouped_file_order" is the grouped layout
with the identity permutation (rows not reordered), which separates grouping from ordering:

    python -m bench.bench_layout --quant artifacts/quant/quant.pgt --out bench/results/layout_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from pathlib import Path
from unittest import mock

import numpy as np

from bench.timing import timed
from pgolf.compress import artifact, compress, grouping
from pgolf.config import CompressConfig
from pgolf.quantize.quantize import QUANT_FILE
from pgolf.shared.layout import QUANT


def measure(quant: Path) -> dict:
    tensors, meta = compress.load_quant(quant)
    cfg = CompressConfig(brotli=True)
    rows = []
    identity = mock.patch.object(grouping, "row_order", lambda block: np.arange(len(block)))
    for name, layout, patch in (("flat", "flat", None), ("grouped", "grouped", None),
                                ("grouped_file_order", "grouped", identity)):
        with patch or contextlib.nullcontext():
            raw, serialize_s = timed(artifact.serialize, tensors, meta, layout)
        rows.append({"layout": name, "raw_bytes": len(raw), "serialize_seconds": round(serialize_s, 3),
                     **{f"{c}_bytes": n for c, n in compress.sizes(raw, cfg).items()}})
    return {"quant": str(quant), "tensors": len(tensors), "codecs": "lzma preset 9, zstd 22, brotli 11 window 24",
            "python": platform.python_version(), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", type=Path, default=QUANT / QUANT_FILE)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = measure(args.quant)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
