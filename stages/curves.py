"""Stage `curves`: plots/train.tsv -> plots/train.png (pgolf.curves.curves), the training curves as an
image that `dvc plots show/diff` displays offline."""

from __future__ import annotations

import sys

from pgolf.curves.curves import CurvesError, run
from pgolf.shared.io import OutputError
from stages import entry


@entry("curves", (CurvesError, OutputError))
def main() -> int:
    png = run()
    print(f"curves: wrote {png} ({png.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
