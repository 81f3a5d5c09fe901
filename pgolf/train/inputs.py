"""Where the train stage reads and writes, and the check of what it reads.

This module owns `Paths` (dvc.yaml's deps and outs of the stage), `check_inputs` (shards,
tokenizer metadata and byte tables present and consistent, every token id within
`model.vocab_size`, the validation byte sidecar parallel to the val shards where there is one,
read before step 1) and `TrainError`, the error a run stops with on bad input or divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf.config import ModelConfig, TrainConfig
from pgolf.shared import layout, val_bytes
from pgolf.shared.bpb import load_val_tokens
from pgolf.shared.byte_tables import byte_tables_path, load_byte_tables
from pgolf.shared.shards import list_shards, max_token_id, read_shard_header
from pgolf.shared.tokenizer_meta import read_tokenizer_meta, text_transform, tokenizer_meta_path


class TrainError(ValueError):
    """Bad training input (data, tokenizer, checkpoint) or a diverged run; names the file/param."""


@dataclass(frozen=True)
class Paths:
    """Where the train stage reads and writes (dvc.yaml's deps/outs), relative to the cwd."""

    shards: Path = layout.SHARDS
    tokenizer: Path = layout.TOKENIZER
    out_dir: Path = layout.TRAIN
    metrics: Path = layout.TRAIN_METRICS
    plots: Path = layout.TRAIN_TSV


@dataclass
class Inputs:
    train_shards: list[Path]
    val_tokens: np.ndarray
    tables: object  # the val byte counter: ByteTables, or the byte sidecar's SidecarBytes (pgolf.shared.val_bytes)
    tokenizer: dict  # tokenizer.json
    data_id: dict  # what the checkpoint fingerprint records about the data


def check_inputs(paths: Paths, mcfg: ModelConfig, cfg: TrainConfig) -> Inputs:
    """Shards, tokenizer metadata and byte tables present, every token id within model.vocab_size
    (the params against the data's metadata are the data_check gate's: pgolf.params.data_check)."""
    train = list_shards(paths.shards, "train")
    sizes = [read_shard_header(p) for p in train]
    try:
        meta = read_tokenizer_meta(paths.tokenizer)
    except ValueError as e:
        raise TrainError(str(e)) from None
    tables = load_byte_tables(paths.tokenizer)
    if tables.vocab_size != int(meta["vocab_size"]):
        raise TrainError(f"{byte_tables_path(paths.tokenizer)}: byte tables cover {tables.vocab_size} "
                         f"tokens, {tokenizer_meta_path(paths.tokenizer)} says {meta['vocab_size']}")
    for shard in train:  # every shard, before step 1 (a bad id would otherwise fail at its step)
        top = max_token_id(shard)
        if top >= mcfg.vocab_size:
            raise TrainError(f"{shard}: token id {top} >= model.vocab_size {mcfg.vocab_size}")
    val = load_val_tokens(paths.shards, cfg.val_tokens)
    if int(val.max()) >= mcfg.vocab_size:
        raise TrainError(f"{paths.shards}: validation token id {int(val.max())} >= model.vocab_size {mcfg.vocab_size}")
    try:
        tables = val_bytes.byte_counter(paths.shards, tables, val, text_transform(meta))
    except val_bytes.SidecarError as e:
        raise TrainError(str(e)) from None
    data_id = {"train_shards": [[p.name, n] for p, n in zip(train, sizes)], "tokenizer_sha256": meta["sha256"]}
    return Inputs(train, val, tables, meta, data_id)
