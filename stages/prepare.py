"""Stage `prepare`: params.yaml `prepare` section -> data/tokenizer, data/shards, metrics/prepare.json."""

from __future__ import annotations

import sys

from pgolf import config
from pgolf.corpus import CorpusError
from pgolf.shards import ShardError
from pgolf.prepare import run
from pgolf.tensorfile import TensorFileError
from pgolf.tokenizer import TokenizerError
from pgolf.io import OutputError
from stages import entry

EXPECTED_ERRORS = (OutputError, config.ConfigError, CorpusError, ShardError, TokenizerError, TensorFileError,
                   FileNotFoundError)


@entry("prepare", EXPECTED_ERRORS)
def main() -> int:
    m = run(config.load("prepare"))
    print(f"prepare: vocab {m['vocab_size']}, train {m['train_tokens']:,} tokens in {m['train_docs']:,} docs, "
          f"val {m['val_tokens']:,} tokens in {m['val_docs']:,} docs, val {m['val_bytes']:,} bytes "
          f"({m['bytes_per_token']:.4f} bytes/token), tokenizer sha256 {m['tokenizer_sha256'][:12]}, "
          f"{m['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
