"""Test-only loader of the anchor record scripts in ../shared/anchors (PR #535, PR #2135), for the
faithfulness tests: each script is imported as a module, with its environment-variable settings
given explicitly and the FlashAttention stand-in in tests/anchor_stubs first on sys.path."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors"
STUBS = Path(__file__).resolve().parent / "anchor_stubs"
_loaded: dict[tuple, object] = {}


def anchor_path(name: str, file: str = "train_gpt.py") -> Path:
    """../shared/anchors/<name>/<file>; the test is skipped where the folder is absent."""
    path = ANCHORS / name / file
    if not path.is_file():
        pytest.skip(f"{path} is absent (the anchors live in ../shared)")
    return path


def load_script(name: str, env: dict[str, str] | None = None, file: str = "train_gpt.py"):
    """Import anchors/<name>/<file> with `env` set while its module body runs (the scripts read
    their settings from os.environ at import); one module per (name, file, env)."""
    key = (name, file, tuple(sorted((env or {}).items())))
    if key in _loaded:
        return _loaded[key]
    path = anchor_path(name, file)
    if str(STUBS) not in sys.path:
        sys.path.insert(0, str(STUBS))
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        spec = importlib.util.spec_from_file_location(f"anchor_{name}_{len(_loaded)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _loaded[key] = module
    return module
