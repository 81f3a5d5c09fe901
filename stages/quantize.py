"""Stage `quantize`: params `quantize` section, artifacts/train/{model,hessians}.pgt
-> artifacts/quant/{quant.pgt, hdiag.pgt, table.json}, metrics/quant.json (logic in pgolf.quantize.quantize).

No byte counting here: pruning and the byte budget belong to the compress stage. A quantize.bits
other than the bits of training's late QAT prints a warning line (and metrics/quant.json says so)."""

from __future__ import annotations

import sys

from pgolf import config
from pgolf.shared import checked
from pgolf.shared.io import OutputError
from pgolf.quantize.quantize import QuantizeError, qat_warning, run, summary_line
from pgolf.shared.tensorfile import TensorFileError
from pgolf.shared.train_files import HessianError

from stages import entry

EXPECTED_ERRORS = (OutputError, config.ConfigError, QuantizeError, HessianError, TensorFileError, FileNotFoundError)


@entry("quantize", EXPECTED_ERRORS)
def main() -> int:
    m = run(checked.read("quantize"))
    warning = qat_warning(m)
    if warning:
        print(warning)
    print(summary_line(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
