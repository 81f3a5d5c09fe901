"""Stage `curves`: plots/train.tsv -> plots/train.png (pgolf.curves), the training curves as an
image that `dvc plots show/diff` displays offline."""

from __future__ import annotations

import sys

from pgolf.curves import CurvesError, run
from pgolf.io import OutputError


def main() -> int:
    try:
        png = run()
    except (CurvesError, OutputError) as e:
        print(f"curves: error: {e}", file=sys.stderr)
        return 1
    print(f"curves: wrote {png} ({png.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
