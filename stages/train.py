"""Stage `train`: params.yaml `model` + `train` -> artifacts/train, metrics/train.json, plots/train.tsv.

With train.nproc_per_node > 1 (and not already under torchrun) the stage re-executes itself
through torchrun, one process per GPU; every process runs pgolf.train.train.run, rank 0 writes.
"""

from __future__ import annotations

import sys

from pgolf import config
from pgolf.shared import checked, dist
from pgolf.shared.shards import ShardError
from pgolf.shared.train_files import HessianError
from pgolf.shared.tensorfile import TensorFileError
from pgolf.train.train import TrainError, run
from pgolf.shared.io import OutputError

from stages import entry

EXPECTED_ERRORS = (OutputError, config.ConfigError, ShardError, TensorFileError, TrainError, HessianError, FileNotFoundError)
SAME_ON_EVERY_RANK = (config.ConfigError, ShardError, TrainError)  # printed by rank 0 alone


@entry("train", EXPECTED_ERRORS, rank0_only=SAME_ON_EVERY_RANK)
def main() -> int:
    mcfg, tcfg = checked.read("model"), checked.read("train")
    if tcfg.nproc_per_node > 1 and not dist.under_torchrun():
        return dist.relaunch_with_torchrun("stages.train", tcfg.nproc_per_node)
    result = run(mcfg, tcfg)
    dist.shutdown()
    m = result.metrics
    dist.print0(f"train: {m['steps']} steps, {m['train_seconds']:.1f} s, {m['tokens_per_second']:,.0f} tokens/s, "
                f"val_bpb_float {m['val_bpb_float']:.4f}, Hessian overhead {m['hessian_overhead_pct']}%, "
                f"peak memory {m['peak_memory_mb']:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
