"""Stage `quantize`: params `quantize` + `compress` sections, artifacts/train/{model,hessians}.pgt
-> artifacts/quant/{quant.pgt, table.json}, metrics/quant.json.

Pruning targets model + the packed train_gpt.py (pgolf.pack, built from the sources and params here)."""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf import config, pack
from pgolf.prune import PruneError
from pgolf.quantize import QuantizeError, run, summary_line
from pgolf.tensorfile import TensorFileError
from pgolf.io import OutputError

EXPECTED_ERRORS = (OutputError, config.ConfigError, QuantizeError, PruneError, TensorFileError, pack.PackError,
                   FileNotFoundError)


def main() -> int:
    try:
        qcfg = config.load("quantize")
        ccfg = config.load("compress")
        code = len(pack.build_script(Path("."))) if qcfg.prune else 0
        m = run(qcfg, ccfg, code_bytes=code)
    except EXPECTED_ERRORS as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 1
    print(summary_line(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
