"""Thin entry points of the DVC stages: `python -m stages.<name>` (logic lives in pgolf/).

This package also owns the one error skeleton they share: `entry(stage, errors)` wraps a stage's
`main` so that an expected error prints `<stage>: error: <message>` (`<stage> (rank R)` under
torchrun) on stderr and exits 1, and `fail` prints one such line itself.
"""

from __future__ import annotations

import functools
import os
import sys


def fail(stage: str, error: object, rank0_only: tuple[type[Exception], ...] = ()) -> int:
    """Print `<stage>[ (rank R)]: error: <error>` on stderr and return 1, the exit code of a failed stage.

    An error of a type in `rank0_only` is printed by rank 0 alone (every rank raises the same one).
    """
    # the torchrun variables as pgolf.shared.dist.env_place reads them; not imported from there, which
    # would load torch into the stages that never need it (params, data_check, curves)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0 or not isinstance(error, rank0_only):
        where = f"{stage} (rank {rank})" if world > 1 else stage
        print(f"{where}: error: {error}", file=sys.stderr)
    return 1


def entry(stage: str, errors: tuple[type[Exception], ...], rank0_only: tuple[type[Exception], ...] = ()):
    """Decorator of a stage's `main() -> int`: an error of `errors` becomes `fail(stage, e)`."""
    def wrap(main):
        @functools.wraps(main)
        def guarded() -> int:
            try:
                return main()
            except errors as e:
                return fail(stage, e, rank0_only)  # no barrier: the process exit ends a torchrun group
        return guarded
    return wrap
