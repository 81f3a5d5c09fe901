"""Test-wide setup: without CUDA, Triton runs in interpreter mode (must be set before kernels are
defined, because the choice is made when they are decorated); GPU tests skip without CUDA."""

import os
from contextlib import contextmanager

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
