"""Stage `evaluate`: artifacts/final/model.ptz (+ val shards, tokenizer) -> metrics/eval.json.

Scores the artifact alone (sliding window, and non-sliding over the same tokens) and prints one
result line (`pgolf summary` prints the whole summary, once, at the end of the
Quickstart). With evaluate.nproc_per_node > 1 (and not already under torchrun)
the stage re-executes itself through torchrun; every rank scores its share, rank 0 writes.
"""

from __future__ import annotations

import sys

from pgolf import config
from pgolf.shared import checked, dist
from pgolf.compress.artifact import ArtifactError
from pgolf.shared.shards import ShardError
from pgolf.evaluate.evaluate import EvaluateError, run
from pgolf.shared.tensorfile import TensorFileError
from pgolf.shared.io import OutputError
from stages import entry

EXPECTED_ERRORS = (OutputError, config.ConfigError, ArtifactError, TensorFileError, ShardError, EvaluateError,
                   FileNotFoundError, ValueError)


@entry("evaluate", EXPECTED_ERRORS)
def main() -> int:
    cfg = checked.read("evaluate")
    if cfg.nproc_per_node > 1 and not dist.under_torchrun():
        return dist.relaunch_with_torchrun("stages.evaluate", cfg.nproc_per_node)
    m = run(cfg)
    dist.shutdown()
    how = (f"{m['ttt_scheme']} score-first TTT, {m['val_bpb_pre_ttt']:.5f} before; " if "ttt_scheme" in m
           else "sliding, ")
    if "val_bpb_untilted" in m:
        how += f"n-gram tilt, {m['val_bpb_untilted']:.5f} without; "
    dist.print0(f"evaluate: val_bpb {m['val_bpb']:.5f} ({how}context {m['context']}, stride {m['stride']}, "
                f"{m['windows']:,} windows), non-sliding {m['val_bpb_nonsliding']:.5f}, "
                f"{m['scored_tokens']:,} tokens / {m['scored_bytes']:,} bytes, {m['eval_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
