"""Training-step throughput of the record recipe: ms per 786,432-token step, tokens/s, MFU, memory.

    python -m bench.bench_train --out bench/results/train_1gpu.json                 # 1 GPU
    torchrun --standalone --nproc_per_node=8 -m bench.bench_train --out ...8gpu.json  # 8 GPUs
    python -m bench.bench_train --small --out /tmp/train_cpu.json                   # CPU smoke run

Runs the real training loop (`pgolf.train.train.Trainer`: compiled model, Parallel Muon when world > 1,
AdamW, grad clipping, EMA) at the record config on SYNTHETIC tokens (uniform random ids written as
challenge shards in a temp folder): throughput does not depend on the token values, and FineWeb
training data is not available offline. Each variant compiles, primes for `--warmup` steps,
then times `--steps` steps; the median step is reported. Variants: fused MLP on/off, and the
online-Hessian step (its extra cost, amortised over train.hessian_every, is the overhead).

MFU counts 6 x (matrix params incl. the tied head) + 6 x layers x seq_len x model_dim (causal
attention, fwd+bwd) FLOPs per token against 989 TFLOP/s dense bf16 per GPU (H100/H200 SXM datasheet).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overrides import SMALL_MODEL  # noqa: E402
from pgolf.shared import dist  # noqa: E402
from pgolf.prepare import tokenizer  # noqa: E402
from pgolf.config import ModelConfig, TrainConfig  # noqa: E402
from pgolf.shared.byte_tables import byte_tables_path  # noqa: E402
from pgolf.shared.shards import write_shard  # noqa: E402
from pgolf.shared.tokenizer_meta import write_tokenizer_meta  # noqa: E402
from pgolf.shared.io import write_json  # noqa: E402
from pgolf.train.train import Paths, Trainer, check_inputs  # noqa: E402

PEAK_BF16 = 989e12
SP_MODEL = Path(__file__).resolve().parents[1] / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"


def synthetic_data(root: Path, mcfg: ModelConfig, train_tokens: int, seed: int = 0, sp_model: Path = SP_MODEL) -> Paths:
    """Random-token train/val shards + the tokenizer files (sp1024 by default), in challenge layout."""
    rng = np.random.default_rng(seed)
    shards = root / "shards"
    shards.mkdir(parents=True)
    write_shard(shards / "fineweb_train_000000.bin", rng.integers(0, mcfg.vocab_size, train_tokens, dtype=np.uint16))
    write_shard(shards / "fineweb_val_000000.bin", rng.integers(0, mcfg.vocab_size, 1 << 16, dtype=np.uint16))
    return shard_paths(root, shards, mcfg, sp_model)


def shard_paths(root: Path, shards: Path, mcfg: ModelConfig, sp_model: Path = SP_MODEL) -> Paths:
    """Paths for training on the challenge-format `shards` folder, with the files of the
    tokenizer `sp_model` (sp1024 by default: tokenizer.json, byte tables) written under `root`."""
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    sp = tokenizer.load_tokenizer(sp_model, mcfg.vocab_size)
    sha = tokenizer.file_sha256(sp_model)
    tokenizer.build_byte_tables(sp, mcfg.vocab_size, {"tokenizer_sha256": sha, "vocab_size": mcfg.vocab_size}).save(
        byte_tables_path(tok))
    write_tokenizer_meta(tok, {"model_file": sp_model.name, "vocab_size": mcfg.vocab_size, "sha256": sha,
                               "source": str(sp_model)})
    return Paths(shards=shards, tokenizer=tok, out_dir=root / "out", metrics=root / "m.json", plots=root / "p.tsv")


def flops_per_token(model, mcfg: ModelConfig, seq_len: int) -> float:
    groups = model.optimizer_groups()
    matrix = sum(p.numel() for p in groups["matrix"]) + model.tok_emb.weight.numel()  # + tied head
    return 6.0 * matrix + 6.0 * mcfg.num_layers * seq_len * mcfg.model_dim


def run_variant(name: str, mcfg: ModelConfig, cfg: TrainConfig, paths: Paths, info, steps: int) -> dict:
    trainer = Trainer(mcfg, cfg, paths, info, check_inputs(paths, mcfg, cfg))
    trainer.warmup()
    if trainer.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = trainer.step_ms[1:]  # the first timed step still pays lazy allocations
    hess = [t for t, k in zip(trainer.step_ms, trainer.step_kind) if k == "h"]
    plain = [t for t, k in zip(trainer.step_ms, trainer.step_kind) if k != "h"][1:]
    med = statistics.median(plain or times)
    world = info.world_size
    fpt = flops_per_token(trainer.model, mcfg, cfg.seq_len)
    out = {
        "variant": name, "steps_timed": len(times), "step_ms_median": round(med, 2),
        "step_ms_min": round(min(plain or times), 2), "step_ms_max": round(max(plain or times), 2),
        "tokens_per_second": round(cfg.batch_tokens / (med / 1000.0), 0),
        "mfu": round(fpt * cfg.batch_tokens / (med / 1000.0) / (PEAK_BF16 * world), 4),
        "hessian_step_ms_median": round(statistics.median(hess), 2) if hess else None,
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 0) if trainer.cuda else None,
        "warmup_seconds": round(trainer.priming.seconds, 1),
    }
    if hess and cfg.hessian_every > 0:
        out["hessian_overhead_pct_at_every"] = {
            str(cfg.hessian_every): round(100.0 * (out["hessian_step_ms_median"] - med) / cfg.hessian_every / med, 3),
            "25": round(100.0 * (out["hessian_step_ms_median"] - med) / 25 / med, 3)}
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="compile-priming steps per variant")
    ap.add_argument("--variants", nargs="*", default=["fused", "eager_mlp"])
    ap.add_argument("--small", action="store_true", help="CPU smoke run at a tiny config")
    args = ap.parse_args()
    info = dist.init("cpu" if args.small else "cuda")
    mcfg = ModelConfig()
    cfg = TrainConfig(nproc_per_node=info.world_size, warmup_steps=args.warmup, iterations=args.steps + 1,
                      max_wallclock_seconds=0.0, warmdown_iters=0, checkpoint_every=0, log_every=0,
                      hessian_every=4, hessian_start_scale=1.01, late_qat_threshold=0.0, val_tokens=4096)
    if args.small:
        mcfg = dataclasses.replace(mcfg, **SMALL_MODEL)
        cfg = dataclasses.replace(cfg, batch_tokens=2048, seq_len=128, grad_accum_steps=1, compile=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_data(Path(tmp), mcfg, cfg.batch_tokens * (args.steps + args.warmup + 2) + 1)
        for name in args.variants:
            vcfg = dataclasses.replace(cfg, fused_mlp=(name == "fused"))
            results.append(run_variant(name, mcfg, vcfg, paths, info, args.steps))
            dist.print0(json.dumps(results[-1]))
    if info.is_main:
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.small else "cpu"
        import triton

        write_json(args.out, {
            "what": "ms per optimizer step of the record config (11L 512d, 786,432 tokens/step), synthetic tokens",
            "device": dev, "world_size": info.world_size, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "batch_tokens": cfg.batch_tokens, "seq_len": cfg.seq_len,
            "grad_accum_steps": cfg.batch_split(info.world_size).accum, "results": results})
    dist.shutdown()


if __name__ == "__main__":
    main()
