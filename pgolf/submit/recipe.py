"""The whole recipe in one run: the body of the packed `train_gpt.py` (pgolf.compress.pack).

`main(params, script)` does what `dvc repro` does, with the same library calls and the params
baked into the script, in the challenge's data layout: the current folder holds
`./data/datasets/fineweb10B_sp{V}/` (fineweb_train_*.bin, fineweb_val_*.bin) and
`./data/tokenizers/fineweb_{V}_bpe.model`; everything the run writes goes to `./pgolf_run/`
(data/tokenizer + linked shards, artifacts/{train,quant,final}, metrics/*.json, train_gpt.log).

    prepare (rank 0: link the shards, tokenizer byte tables) -> train (every rank, online Hessians)
    -> quantize + compress (rank 0; ±1 pruning in compress; code bytes = this script's own bytes) -> evaluate (every rank)

Under plain python with train.nproc_per_node > 1 it relaunches itself through torchrun. It
prints the challenge's usual log lines (`step:… val_loss:… val_bpb:…`, `Total submission size …`,
`final_int6_… val_loss:… val_bpb:…`) besides the trainer's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as tdist

from pgolf import config
from pgolf.shared import dist
from pgolf.prepare import prepare
from pgolf.train import train
from pgolf.quantize import quantize
from pgolf.compress import compress
from pgolf.evaluate import evaluate
from pgolf.compress.artifact import ArtifactError
from pgolf.compress.compress import CompressError, build, over_cap_message
from pgolf.prepare.corpus import CorpusError
from pgolf.shared.shards import ShardError
from pgolf.shared.train_files import HessianError
from pgolf.shared.io import OutputError
from pgolf.compress.prune import PruneError
from pgolf.shared.tensorfile import TensorFileError
from pgolf.prepare.tokenizer import TokenizerError

RUN_DIR = "pgolf_run"
DATASET = "data/datasets/fineweb10B_sp{vocab}"
TOKENIZER = "data/tokenizers/fineweb_{vocab}_bpe.model"
BARRIER_TIMEOUT_S = 3600.0  # rank 0 quantizes and compresses while the others wait
EXPECTED_ERRORS = (config.ConfigError, ArtifactError, CompressError, CorpusError, ShardError, HessianError,
                   PruneError, TensorFileError, TokenizerError, train.TrainError, quantize.QuantizeError,
                   evaluate.EvaluateError, FileNotFoundError, OutputError)


class RecipeError(ValueError):
    """The challenge data layout is not there; names the missing path."""


def configs(params: dict) -> dict:
    """{section: dataclass} of the baked params (checked by the params gate before compress baked them)."""
    return {s: config.restore(s, params.get(s), "train_gpt.py's baked params")
            for s in ("model", "train", "quantize", "compress", "evaluate")}


def challenge_inputs(cwd: Path, vocab: int) -> tuple[Path, Path]:
    """(shard folder, tokenizer .model) of the challenge layout under `cwd`, or RecipeError."""
    shards, tok = cwd / DATASET.format(vocab=vocab), cwd / TOKENIZER.format(vocab=vocab)
    if not shards.is_dir():
        raise RecipeError(f"{shards}: challenge shard folder not found (expected fineweb_train_*.bin and "
                          f"fineweb_val_*.bin there)")
    if not tok.is_file():
        raise RecipeError(f"{tok}: tokenizer not found")
    return shards, tok


class Log:
    """Rank 0 prints each line and appends it to pgolf_run/train_gpt.log."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main

    def __call__(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _barrier(info: dist.DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


def _prepare(shards: Path, tok: Path, vocab: int, work: Path) -> dict:
    cfg = config.check(config.PrepareConfig(source="fineweb", corpus=str(shards), val_source=str(shards), tokenizer=str(tok),
                                            vocab_size=vocab, workers=1))
    return prepare.run(cfg, root=work)


def _train(cfgs: dict, log: Log) -> dict:
    m = train.run(cfgs["model"], cfgs["train"]).metrics
    log(f"step:{m['steps']}/{cfgs['train'].iterations} val_loss:{m['val_loss_float']:.4f} "
        f"val_bpb:{m['val_bpb_float']:.4f} train_time:{m['train_seconds'] * 1000:.0f}ms step_avg:{m['step_avg_ms']:.2f}ms")
    return m


def _quantize_compress(cfgs: dict, script: bytes, log: Log) -> dict:
    q = quantize.run(cfgs["quantize"])
    for line in (quantize.qat_warning(q), quantize.summary_line(q)):
        if line:
            log(line)
    m = build(cfgs["compress"], script)
    log(compress.summary_line(m))
    tag = f"int{cfgs['quantize'].bits}+{m['codec']}"
    log(f"Serialized model {tag}: {m['model_bytes']} bytes")
    log(f"Code size: {m['code_bytes']} bytes")
    log(f"Total submission size {tag}: {m['total_bytes']} bytes")
    return m


def _evaluate(cfgs: dict, log: Log) -> dict:
    e = evaluate.run(cfgs["evaluate"])
    name = f"final_int{cfgs['quantize'].bits}"
    log(f"{name}_roundtrip val_loss:{e['val_loss_nonsliding']:.4f} val_bpb:{e['val_bpb_nonsliding']:.4f} "
        f"eval_time:{e['nonsliding_seconds'] * 1000:.0f}ms")
    log(f"{name}_roundtrip_exact val_loss:{e['val_loss_nonsliding']:.8f} val_bpb:{e['val_bpb_nonsliding']:.8f}")
    loss, val_bpb = e.get("val_loss_pre_ttt", e["val_loss"]), e.get("val_bpb_pre_ttt", e["val_bpb"])
    if e["stride"] > 0:
        log(f"{name}_sliding_window val_loss:{loss:.4f} val_bpb:{val_bpb:.4f} stride:{e['stride']} "
            f"eval_time:{e['sliding_seconds'] * 1000:.0f}ms")
        log(f"{name}_sliding_window_exact val_loss:{loss:.8f} val_bpb:{val_bpb:.8f}")
    if "ttt_seconds" in e:
        log(f"legal_ttt val_loss:{e['val_loss']:.4f} val_bpb:{e['val_bpb']:.4f} eval_time:{e['ttt_seconds'] * 1000:.0f}ms")
        log(f"legal_ttt_exact val_loss:{e['val_loss']:.8f} val_bpb:{e['val_bpb']:.8f}")
    return e


def run(cfgs: dict, script_path: Path, cwd: Path) -> int:
    """The recipe on this rank; returns the exit code (1 when rank 0 finds the artifact over the cap)."""
    vocab = cfgs["model"].vocab_size
    shards, tok = challenge_inputs(cwd, vocab)
    script = script_path.read_bytes()
    info = dist.init(cfgs["train"].device, timeout_s=BARRIER_TIMEOUT_S)
    work = cwd / RUN_DIR
    work.mkdir(exist_ok=True)
    log = Log(work / "train_gpt.log", info.is_main)
    if info.is_main:
        (work / "train_gpt.log").write_text("")
        p = _prepare(shards, tok, vocab, work)
        log(f"data: {p['train_tokens']:,} train tokens in {p['train_shards']} shard(s), {p['val_tokens']:,} val "
            f"tokens, tokenizer {tok.name} (sha256 {p['tokenizer_sha256'][:12]})")
    _barrier(info)
    os.chdir(work)
    _train(cfgs, log)
    size = _quantize_compress(cfgs, script, log) if info.is_main else None
    _barrier(info)
    _evaluate(cfgs, log)
    dist.shutdown()
    if size is not None and not size["under_cap"]:
        log(f"error: {over_cap_message(size)}")
        return 1
    return 0


def main(params: dict, script_path: str) -> int:
    """Entry point of the packed script: read the baked params, relaunch under torchrun if
    asked, run the recipe; a clear one-line error (exit 1) on bad input."""
    try:
        cfgs = configs(params)
    except config.ConfigError as e:
        print(f"train_gpt.py: error: baked {e}", file=sys.stderr)
        return 1
    nproc = cfgs["train"].nproc_per_node
    if nproc > 1 and not dist.under_torchrun():
        return dist.relaunch_with_torchrun(script_path, nproc)
    try:
        return run(cfgs, Path(script_path), Path.cwd())
    except (RecipeError, *EXPECTED_ERRORS) as e:
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        return 1
