"""Stage `compress`: artifacts/quant/{quant.pgt, hdiag.pgt} -> artifacts/final/{model.ptz, train_gpt.py,
code_files.json}, metrics/size.json (logic in pgolf.compress.compress: codec choice, ±1 pruning to
compress.target_bytes; the packed script from pgolf.compress.pack).

Over the cap the metrics are still written (under_cap false) and the stage exits 1 saying by how much.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf import config
from pgolf.shared import checked, layout, tensorfile
from pgolf.compress import pack
from pgolf.compress.compress import CompressError, build, over_cap_message, summary_line
from pgolf.shared.io import OutputError
from pgolf.compress.prune import PruneError
from stages import entry, fail

__all__ = ["CompressError", "build", "main"]
EXPECTED_ERRORS = (config.ConfigError, tensorfile.TensorFileError, CompressError, PruneError, pack.PackError,
                   FileNotFoundError, OutputError)


@entry("compress", EXPECTED_ERRORS)
def main() -> int:
    cfgs = checked.read_all(pack.BAKED_SECTIONS)
    script = pack.build_script(Path("."), cfgs)
    m = build(cfgs["compress"], script, eval_files=pack.code_files("."))
    print(summary_line(m))
    if not m["under_cap"]:
        return fail("compress", f"{over_cap_message(m)}; {layout.SIZE_METRICS} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
