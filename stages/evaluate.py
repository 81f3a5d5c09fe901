"""Stage `evaluate`: artifacts/final/model.ptz (+ val shards, tokenizer) -> metrics/eval.json.

Scores the artifact alone (sliding window, and non-sliding over the same tokens) and prints one
result line (`python -m pgolf.summary` prints the whole summary, once, at the end of the
Quickstart). With evaluate.nproc_per_node > 1 (and not already under torchrun)
the stage re-executes itself through torchrun; every rank scores its share, rank 0 writes.
"""

from __future__ import annotations

import os
import sys

from pgolf import config, dist
from pgolf.artifact import ArtifactError
from pgolf.data import ShardError
from pgolf.evaluate import EvaluateError, run, validate
from pgolf.tensorfile import TensorFileError
from pgolf.io import OutputError

EXPECTED_ERRORS = (OutputError, config.ConfigError, ArtifactError, TensorFileError, ShardError, EvaluateError,
                   FileNotFoundError, ValueError)


def _error(e: Exception) -> int:
    rank = int(os.environ.get("RANK", 0))
    where = f"evaluate (rank {rank})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "evaluate"
    print(f"{where}: error: {e}", file=sys.stderr)
    return 1


def main() -> int:
    try:
        cfg = config.load("evaluate")
        validate(cfg)
    except EXPECTED_ERRORS as e:
        return _error(e)
    if cfg.nproc_per_node > 1 and not dist.under_torchrun():
        return dist.relaunch_with_torchrun("stages.evaluate", cfg.nproc_per_node)
    try:
        m = run(cfg)
    except EXPECTED_ERRORS as e:
        return _error(e)
    dist.shutdown()
    dist.print0(f"evaluate: val_bpb {m['val_bpb']:.5f} (sliding, context {m['context']}, stride {m['stride']}, "
                f"{m['windows']:,} windows), non-sliding {m['val_bpb_nonsliding']:.5f}, "
                f"{m['scored_tokens']:,} tokens / {m['scored_bytes']:,} bytes, {m['eval_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
