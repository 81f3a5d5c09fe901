"""The tokenizer's metadata file, `data/tokenizer/tokenizer.json` {model_file, vocab_size,
sha256, source[, text_transform]}: prepare writes it, training and evaluation read it to check that
a model and the shards share one tokenizer, and that data prepared with a text transform
(`prepare.text_transform`, absent = "none") is scored on its byte sidecar. This module owns its
name, writing and reading.
"""

from __future__ import annotations

import json
from pathlib import Path

from pgolf.shared.io import write_json

TOKENIZER_META_FILE = "tokenizer.json"
KEYS = ("model_file", "vocab_size", "sha256")  # required; `source` says where the model came from
TEXT_TRANSFORM = "text_transform"  # written only when not "none", so a plain run's file is unchanged


def tokenizer_meta_path(tokenizer_dir: str | Path) -> Path:
    return Path(tokenizer_dir) / TOKENIZER_META_FILE


def write_tokenizer_meta(tokenizer_dir: str | Path, meta: dict) -> None:
    write_json(tokenizer_meta_path(tokenizer_dir), meta)


def read_tokenizer_meta(tokenizer_dir: str | Path) -> dict:
    """The tokenizer.json written by prepare: model_file, vocab_size, sha256, source."""
    path = tokenizer_meta_path(tokenizer_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer metadata not found (run the prepare stage first)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    for key in KEYS:
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def text_transform(meta: dict) -> str:
    """The text transform the data was prepared with ("none" when tokenizer.json does not say)."""
    return str(meta.get(TEXT_TRANSFORM, "none"))
