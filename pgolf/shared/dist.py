"""The one place where torch.distributed is set up and torchrun is launched.

`init()` reads the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE); without it the process
runs alone. NCCL on CUDA, gloo on CPU. `relaunch_with_torchrun()` lets a stage re-execute itself
under torchrun when its params ask for more than one process per node; `NCCL_NVLS_ENABLE=0`
is set in every launched environment.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available")
    return torch.device("cuda", local_rank)


def env_place() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) without it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def init(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Initialise the process group if launched by torchrun; return this process's place.
    `timeout_s` bounds collectives (torch's default, 10 min, when None)."""
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    rank, local_rank, world = env_place()
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        extra = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None, **extra)
    return DistInfo(rank, local_rank, world, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (SUM by default); a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def print0(*args, **kwargs) -> None:
    if env_place()[0] == 0:
        print(*args, **kwargs, flush=True)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ


def relaunch_with_torchrun(module: str, nproc_per_node: int, extra_args: list[str] | None = None) -> int:
    """Run `python -m torch.distributed.run ... -m module` and return its exit code.

    This launches one node. For several nodes, users start `torchrun` themselves with its
    rendezvous flags (README); a stage already under torchrun never relaunches. A `module`
    ending in ".py" is a script path (the packed train_gpt.py) and is run as a file.
    """
    env = {**os.environ, **SAFE_ENV}
    target = [module] if module.endswith(".py") else ["-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc_per_node}", *target, *(extra_args or [])]
    return subprocess.call(cmd, env=env)
