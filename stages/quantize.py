"""Stage `quantize`: params `quantize` + `compress` sections, artifacts/train/{model,hessians}.pgt
-> artifacts/quant/{quant.pgt, table.json}, metrics/quant.json."""

from __future__ import annotations

import sys

from pgolf import config
from pgolf.prune import PruneError
from pgolf.quantize import QuantizeError, run, summary_line
from pgolf.tensorfile import TensorFileError
from pgolf.io import OutputError

EXPECTED_ERRORS = (OutputError, config.ConfigError, QuantizeError, PruneError, TensorFileError, FileNotFoundError)


def main() -> int:
    try:
        qcfg = config.load("quantize")
        ccfg = config.load("compress")
        m = run(qcfg, ccfg)
    except EXPECTED_ERRORS as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 1
    print(summary_line(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
