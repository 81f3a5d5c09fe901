"""Artifact bytes per layout (compress.layout flat / grouped) and codec (lzma-9, zstd-22, brotli-11)
for a quantized file, e.g. the tiny pipeline's. The row "grouped_file_order" is the grouped layout
with the identity permutation (rows not reordered), which separates grouping from ordering:

    python -m bench.bench_layout --quant artifacts/quant/quant.pgt --out bench/results/layout_tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from unittest import mock

import numpy as np

from pgolf.shared import tensorfile
from pgolf.compress import artifact, grouping
from pgolf.config import CompressConfig


def measure(quant: Path) -> dict:
    tensors, header = tensorfile.load(quant, kind="quantized")
    cfg = CompressConfig(brotli=True)
    rows = []
    identity = mock.patch.object(grouping, "row_order", lambda block: np.arange(len(block)))
    for name, layout, patch in (("flat", "flat", None), ("grouped", "grouped", None),
                                ("grouped_file_order", "grouped", identity)):
        t0 = time.perf_counter()
        if patch is None:
            raw = artifact.serialize(tensors, header["meta"], layout)
        else:
            with patch:
                raw = artifact.serialize(tensors, header["meta"], layout)
        serialize_s = time.perf_counter() - t0
        rows.append({"layout": name, "raw_bytes": len(raw), "serialize_seconds": round(serialize_s, 3),
                     **{f"{c}_bytes": n for c, n in artifact.sizes(raw, cfg).items()}})
    return {"quant": str(quant), "tensors": len(tensors), "codecs": "lzma preset 9, zstd 22, brotli 11 window 24",
            "python": platform.python_version(), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", type=Path, default=Path("artifacts/quant/quant.pgt"))
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
