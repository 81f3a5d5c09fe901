"""Test-wide setup: without CUDA, Triton runs in interpreter mode (must be set before kernels are
defined, because the choice is made when they are decorated); GPU tests skip without CUDA.

Comparing numbers: fp32 results are bit-identical only for a rerun of the very same computation
on the same machine. Results of two different paths (other batch shapes, ranks, thread counts)
differ in the last bits, and by how much depends on the CPU model and its BLAS kernels, so such
comparisons use CROSS_PATH_RTOL / `assert_codes_close`, tolerances that hold on any CPU.
"""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pgolf.config import ModelConfig  # noqa: E402 - after TRITON_INTERPRET, before any kernel module
from pgolf.shared.model import GPT  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CROSS_PATH_RTOL = 1e-5  # fp32 losses summed in fp64 along two paths: ~1e-7 seen, 100x headroom


def assert_codes_close(a: torch.Tensor, b: torch.Tensor, max_frac: float = 0.02) -> None:
    """Integer codes from two paths of float math: equal, except a value that sat on a rounding
    boundary may land one step away (at most `max_frac` of the entries)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = (a.int() - b.int()).abs()
    worst = int(diff.max()) if diff.numel() else 0
    assert worst <= 1, f"codes differ by {worst}"
    assert float((diff > 0).float().mean()) <= max_frac, f"{int((diff > 0).sum())} of {diff.numel()} codes differ"


MICRO_CFG = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                        xsa_last_n=1, bigram_buckets=31, bigram_dim=8, ve_dim=8, ve_last_n=1, rope_dims=4)


def tiny_model(seed=0, cfg=MICRO_CFG, train_seq_len=64) -> GPT:
    """A micro GPT in eval mode whose every parameter is perturbed (no zero-initialised weights)."""
    torch.manual_seed(seed)
    m = GPT(cfg, train_seq_len=train_seq_len)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@contextmanager
def single_thread():
    """One intra-op thread: the micro shapes of the tests gain nothing from two, and a second
    busy process on a 2-core box makes OpenMP's spinning threads stall every parallel region."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield


TINY_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # the tiny profile written out (test_config)


def write_params(root: Path, **sections: dict) -> None:
    """params.yaml under `root` (the tiny profile with `sections` replaced) and the params gate's
    checked files beside it, as `dvc repro` leaves them before any other stage runs."""
    from pgolf.params import params

    (root / "params.yaml").write_text(params_yaml(**sections))
    params.run(root / "params.yaml", root)


def params_yaml(**sections: dict) -> str:
    """The tiny profile (every section and key, as a params file must have) with some values replaced."""
    doc = yaml.safe_load(TINY_PARAMS.read_text())
    for section, values in sections.items():
        doc[section].update(values)
    return yaml.safe_dump(doc, sort_keys=False)


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, scenario) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(scenario(rank, world)))
    finally:
        dist.destroy_process_group()


def spawn_ranks(tmp_path_factory, scenario, world: int = 2) -> list[dict]:
    """`scenario(rank, world) -> dict` in `world` processes of one gloo group (set up through a
    file, one thread each); -> each rank's dict, rank order."""
    import json

    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp(scenario.__name__.strip("_"))
    mp.spawn(_rank_main, args=(world, str(d / "init"), str(d), scenario), nprocs=world, join=True)
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(world)]
