"""Stage `data_check`: the checked params against the prepared data (pgolf.params.data_check) ->
artifacts/params/data_check.json, which train and evaluate depend on."""

from __future__ import annotations

import sys

from pgolf import config
from pgolf.shared.io import OutputError
from pgolf.params.data_check import run
from stages import entry


@entry("data_check", (config.ConfigError, OutputError))
def main() -> int:
    facts = run()
    print(f"data_check: params fit the data (tokenizer {facts['vocab_size']} tokens, {facts['train_tokens']:,} "
          f"training and {facts['val_tokens']:,} validation tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
