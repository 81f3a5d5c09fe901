"""The pipeline's file layout: every folder and file that passes between stages, defined once.

This module owns the paths (relative to the repo root) that stages write and read, and that
dvc.yaml repeats as outs/deps/metrics/plots (tests/test_dvc_yaml.py keeps the two equal):

    data/shards, data/tokenizer                 prepare -> train, evaluate
    artifacts/params/<section>.json             params  -> every stage (the gate)
    artifacts/train/                            train   -> quantize
    artifacts/quant/                            quantize -> compress
    artifacts/final/                            compress -> evaluate, export
    metrics/<stage>.json                        each stage -> summary, rules, export
    plots/train.tsv -> plots/train.png          train   -> curves

The rule: folders and stand-alone files (params, metrics, plots) are defined here. A file inside
a folder is named by the module that owns its format, which keeps that NAME constant and takes
the folder from here: pgolf.train_files (model.pgt, hessians.pgt, train.log), pgolf.tokenizer_meta
(tokenizer.json), pgolf.byte_tables (byte_tables.pgt), pgolf.quantize (quant.pgt, hdiag.pgt),
pgolf.artifact (model.ptz). The names of the files no format module
owns are defined here (the `*_FILE` constants below). Paths only: nothing here reads or writes.
"""

from __future__ import annotations

from pathlib import Path

SHARDS = Path("data/shards")
TOKENIZER = Path("data/tokenizer")
TOKENIZER_MODEL_FILE = "tokenizer.model"  # the SentencePiece model prepare copies or trains

PARAMS = Path("artifacts/params")
TRAIN = Path("artifacts/train")
QUANT = Path("artifacts/quant")
QUANT_TABLE_FILE = "table.json"  # quantize's per-tensor report (read by people, not stages)
FINAL = Path("artifacts/final")
SCRIPT_FILE = "train_gpt.py"  # the packed script (pgolf.pack builds it), whose bytes count as code
CODE_FILES_FILE = "code_files.json"  # compress's listing of the counted code

METRICS = Path("metrics")
PREPARE_METRICS = METRICS / "prepare.json"
TRAIN_METRICS = METRICS / "train.json"
QUANT_METRICS = METRICS / "quant.json"
SIZE_METRICS = METRICS / "size.json"
EVAL_METRICS = METRICS / "eval.json"

PLOTS = Path("plots")
TRAIN_TSV = PLOTS / "train.tsv"
TRAIN_PNG = PLOTS / "train.png"


def params_file(section: str) -> Path:
    """artifacts/params/<section>.json, the checked values of one params.yaml section."""
    return PARAMS / f"{section}.json"


def metrics_file(name: str) -> Path:
    """metrics/<name>.json (name: prepare, train, quant, size or eval)."""
    return METRICS / f"{name}.json"
