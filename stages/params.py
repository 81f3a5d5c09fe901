"""Stage `params`: params.yaml -> artifacts/params/<section>.json, the checked values every stage
reads (pgolf.params.params): a bad value stops the pipeline here, every output intact."""

from __future__ import annotations

import sys

from pgolf import config
from pgolf.shared.io import OutputError
from pgolf.params.params import run
from stages import entry


@entry("params", (config.ConfigError, OutputError))
def main() -> int:
    cfgs = run()
    print(f"params: {len(cfgs)} sections of params.yaml checked ({', '.join(cfgs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
