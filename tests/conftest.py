"""Test-wide setup: Triton runs in interpreter mode on CPU (must be set before triton is imported,
because the choice is made when kernels are decorated), and GPU tests skip without CUDA."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
