"""The pipeline's file layout: every folder and file that passes between stages, defined once.

This module owns the paths (relative to the repo root) that stages write and read, and that
dvc.yaml repeats as outs/deps/metrics/plots (tests/test_dvc_yaml.py keeps the two equal):

    data/shards, data/tokenizer                 prepare -> train, evaluate
    artifacts/params/<section>.json             params  -> every stage (the checked values)
    artifacts/params/data_check.json            data_check -> train, evaluate (the second gate)
    artifacts/train/                            train   -> quantize
    artifacts/quant/                            quantize -> compress
    artifacts/final/                            compress -> evaluate, export
    metrics/<stage>.json                        each stage -> summary, rules, export
    plots/train.tsv -> plots/train.png          train   -> curves

The rule: folders and stand-alone files (params, metrics, plots) are defined here. A file inside
a folder is named by the module that owns its format, which keeps that NAME constant and takes
the folder from here: pgolf.shared.train_files (model.pgt, hessians.pgt, train.log), pgolf.shared.tokenizer_meta
(tokenizer.json), pgolf.shared.byte_tables (byte_tables.pgt), pgolf.shared.shards (data/shards'
fineweb_{train,val}_%06d.bin), pgolf.shared.val_bytes (data/shards' validation byte sidecar
fineweb_val_bytes_%06d.bin, CaseOps data only), pgolf.quantize.quantize (quant.pgt, hdiag.pgt),
pgolf.compress.artifact (model.ptz). The files no format module owns are named here (the `*_FILE`
constants below). Paths only: this module imports nothing of pgolf and reads or writes nothing.
"""

from __future__ import annotations

from pathlib import Path

# ---- folders
SHARDS = Path("data/shards")
TOKENIZER = Path("data/tokenizer")
PARAMS = Path("artifacts/params")
TRAIN = Path("artifacts/train")
QUANT = Path("artifacts/quant")
FINAL = Path("artifacts/final")
METRICS = Path("metrics")
PLOTS = Path("plots")

# ---- names of the files inside a folder that no format module owns
TOKENIZER_MODEL_FILE = "tokenizer.model"  # data/tokenizer: the SentencePiece model prepare copies or trains
QUANT_TABLE_FILE = "table.json"  # artifacts/quant: the per-tensor report (read by people, not stages)
SCRIPT_FILE = "train_gpt.py"  # artifacts/final: the packed script (pgolf.compress.pack), whose bytes count as code
CODE_FILES_FILE = "code_files.json"  # artifacts/final: compress's listing of the counted code


def params_file(section: str) -> Path:
    """artifacts/params/<section>.json, the checked values of one params.yaml section."""
    return PARAMS / f"{section}.json"


def metrics_file(name: str) -> Path:
    """metrics/<name>.json (name: prepare, train, quant, size or eval)."""
    return METRICS / f"{name}.json"


# ---- stand-alone files
DATA_CHECK = PARAMS / "data_check.json"  # the prepared data's facts the params were checked against
PREPARE_METRICS = metrics_file("prepare")
TRAIN_METRICS = metrics_file("train")
QUANT_METRICS = metrics_file("quant")
SIZE_METRICS = metrics_file("size")
EVAL_METRICS = metrics_file("eval")
TRAIN_TSV = PLOTS / "train.tsv"  # written by train (rank 0), drawn by curves
TRAIN_PNG = PLOTS / "train.png"
