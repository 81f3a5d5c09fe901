"""Stage `train`: params.yaml `model` + `train` -> artifacts/train, metrics/train.json, plots/train.tsv.

With train.nproc_per_node > 1 (and not already under torchrun) the stage re-executes itself
through torchrun, one process per GPU; every process runs pgolf.train.run, rank 0 writes.
"""

from __future__ import annotations

import os
import sys

from pgolf import config, dist
from pgolf.data import ShardError
from pgolf.hessian import HessianError
from pgolf.tensorfile import TensorFileError
from pgolf.train import TrainError, run, validate
from pgolf.io import OutputError

EXPECTED_ERRORS = (OutputError, config.ConfigError, ShardError, TensorFileError, TrainError, HessianError, FileNotFoundError)


def _error(e: Exception) -> int:
    rank = int(os.environ.get("RANK", 0))
    where = f"train (rank {rank})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "train"
    if rank == 0 or not isinstance(e, (config.ConfigError, ShardError, TrainError)):
        print(f"{where}: error: {e}", file=sys.stderr)
    return 1


def main() -> int:
    try:
        mcfg, tcfg = config.load("model"), config.load("train")
        validate(tcfg, mcfg)
    except EXPECTED_ERRORS as e:
        return _error(e)
    if tcfg.nproc_per_node > 1 and not dist.under_torchrun():
        return dist.relaunch_with_torchrun("stages.train", tcfg.nproc_per_node)
    try:
        result = run(mcfg, tcfg)
    except EXPECTED_ERRORS as e:
        return _error(e)  # no barrier: the process exit ends the group (torchrun stops the others)
    dist.shutdown()
    m = result.metrics
    dist.print0(f"train: {m['steps']} steps, {m['train_seconds']:.1f} s, {m['tokens_per_second']:,.0f} tokens/s, "
                f"val_bpb_float {m['val_bpb_float']:.4f}, Hessian overhead {m['hessian_overhead_pct']}%, "
                f"peak memory {m['peak_memory_mb']:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
