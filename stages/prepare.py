"""Stage `prepare`: params.yaml `prepare` section -> data/tokenizer, data/shards, metrics/prepare.json."""

from __future__ import annotations

import sys

from pgolf import config
from pgolf.shared import checked
from pgolf.prepare.caseops import CaseOpsError
from pgolf.prepare.corpus import CorpusError
from pgolf.shared.shards import ShardError
from pgolf.prepare.prepare import run
from pgolf.shared.tensorfile import TensorFileError
from pgolf.prepare.tokenizer import TokenizerError
from pgolf.shared.io import OutputError
from pgolf.shared.val_bytes import SidecarError
from stages import entry

EXPECTED_ERRORS = (OutputError, config.ConfigError, CorpusError, ShardError, TokenizerError, TensorFileError,
                   FileNotFoundError, CaseOpsError, SidecarError)


@entry("prepare", EXPECTED_ERRORS)
def main() -> int:
    m = run(checked.read("prepare"))
    print(f"prepare: vocab {m['vocab_size']}, train {m['train_tokens']:,} tokens in {m['train_docs']:,} docs, "
          f"val {m['val_tokens']:,} tokens in {m['val_docs']:,} docs, val {m['val_bytes']:,} bytes "
          f"({m['bytes_per_token']:.4f} bytes/token), tokenizer sha256 {m['tokenizer_sha256'][:12]}, "
          f"{m['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
