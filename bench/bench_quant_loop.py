"""The quantize-only loop at record scale: quantize -> compress (unpruned, then a forced pruning
search) -> evaluate, each part timed; writes one JSON to --out.

    python bench/bench_quant_loop.py --out bench/results/quant_loop_cpu.json --max-tokens 4096   # CPU, synthetic
    python bench/bench_quant_loop.py --train-dir artifacts/train --data data/shards \\
        --tokenizer data/tokenizer --out bench/results/quant_loop_h200.json                     # GPU, a real run

Without --train-dir the model is synthetic, of the --profile's model section (the record's: 27.3M
parameters): the GPT's own init, then every block matrix replaced by weights shaped like trained
ones (Student-t values with per-row and per-column log-normal scales, large enough that row clips
sit above the int6 scale floor and the codes spread as a record artifact's do: ~15-17 MB
compressed for 27.5 MB of codes), Hessians random SPD
(bench.bench_gptq.random_hessian; q/k/v share one). Without --data the validation stream is
synthetic too (Zipf-distributed tokens, byte tables of 1-6 bytes per token). The params are the
profile's (--profile: a name, a profiles/*.yaml file or a complete params file) with --context /
--stride / --max-tokens / --device overriding evaluate's.

Pruning is forced: target_bytes = unpruned total - the entropy predictor's saving for
--prune-at-least x 1.5 values (so the search must remove >= that many; the JSON says how many
it did). The JSON: machine, cpu count, torch version, the seconds of every part, the pruned count,
real compressions, bytes, the probes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import overrides  # noqa: E402
from bench.bench_gptq import random_hessian  # noqa: E402
from bench.timing import timed  # noqa: E402
from pgolf import config  # noqa: E402
from pgolf.compress import artifact, compress, pack, prune  # noqa: E402
from pgolf.evaluate import evaluate  # noqa: E402
from pgolf.quantize import quantize  # noqa: E402
from pgolf.shared import train_files  # noqa: E402
from pgolf.shared.byte_tables import ByteTables, byte_tables_path  # noqa: E402
from pgolf.shared.model import GPT, QAT_BITS  # noqa: E402
from pgolf.shared.shards import write_shard  # noqa: E402
from pgolf.shared.tokenizer_meta import read_tokenizer_meta, write_tokenizer_meta  # noqa: E402


def trained_like(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """(rows, cols) fp32: heavy-tailed values (Student-t, 4 dof) x log-normal row and column scales."""
    t = _student_t(rows, cols, g)  # (rows, cols)
    row = torch.exp(0.35 * torch.randn(rows, 1, generator=g))  # (rows, 1)
    col = torch.exp(0.25 * torch.randn(1, cols, generator=g))  # (1, cols)
    return t * row * col * 0.6  # the records' int6 codes: row clips above 1, codes of std ~6 (~4.5 bits each)


def _student_t(rows: int, cols: int, g: torch.Generator, dof: int = 4) -> torch.Tensor:
    z = torch.randn(rows, cols, generator=g)  # (rows, cols)
    chi2 = torch.randn(dof, rows, cols, generator=g).pow(2).sum(0)  # (rows, cols)
    return z / (chi2 / dof).sqrt()


def synthetic_train_dir(out: Path, mcfg: config.ModelConfig, tcfg: config.TrainConfig, tok_meta: dict) -> Path:
    """out/{model,hessians}.pgt as the train stage writes them (pgolf.shared.train_files), for a
    synthetic model trained, as far as the files say, with `tcfg`."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = GPT(mcfg, qat_quantile=tcfg.qat_clip_quantile)
    sd = model.export_state_dict()
    shared, hessians = {}, {}
    for name, cols in model.hessian_shapes().items():
        sd[name] = trained_like(sd[name].shape[0], cols, g)
        key = name.rsplit(".", 2)[0] if ".attn.c_" in name else name  # q/k/v read one input
        if key not in shared:
            shared[key] = random_hessian(cols, 2 * cols, g, "cpu")
        hessians[name] = shared[key]
    out.mkdir(parents=True, exist_ok=True)
    meta = train_files.model_meta(mcfg, tcfg.seq_len, tcfg.qat_clip_quantile, QAT_BITS, tok_meta)
    train_files.save_weights(out / train_files.MODEL_FILE, sd, meta)
    train_files.save_hessians(out / train_files.HESSIANS_FILE, hessians,
                              {"rows": 4096, "accumulations": 1, "world_size": 1})
    return out


def synthetic_data(out: Path, vocab: int, tokens: int) -> tuple[Path, Path]:
    """(shard dir, tokenizer dir): Zipf tokens (BOS = 1 every ~500) and byte tables of 1-6 bytes."""
    rng = np.random.default_rng(0)
    toks = np.minimum(rng.zipf(1.2, tokens + 1), vocab - 1).astype(np.int64)  # (tokens + 1,)
    toks[::500] = 1
    write_shard(out / "shards" / "fineweb_val_000000.bin", toks)
    tok = out / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    meta = {"model_file": "none", "vocab_size": vocab, "sha256": "b" * 64, "source": "bench"}
    write_tokenizer_meta(tok, meta)
    g = torch.Generator().manual_seed(0)
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:2] = True
    ByteTables(torch.randint(1, 7, (vocab,), generator=g), torch.rand(vocab, generator=g) < 0.4, boundary,
               {"tokenizer_sha256": meta["sha256"], "vocab_size": vocab}).save(byte_tables_path(tok))
    return out / "shards", tok


def synthetic_quant(work: Path, profile: str) -> tuple[Path, dict]:
    """A profile's model with trained-like weights and random Hessians, quantized on the CPU under
    `work` -> (its quant.pgt, the profile's checked sections)."""
    from pgolf.shared.tokenizer_meta import read_tokenizer_meta

    cfgs = overrides.load(profile)
    _, tok = synthetic_data(work / "data", cfgs["model"].vocab_size, 4096)
    train = synthetic_train_dir(work / "train", cfgs["model"], cfgs["train"], read_tokenizer_meta(tok))
    quantize.run(dataclasses.replace(cfgs["quantize"], device="cpu"), train, work / "quant", work / "quant.json")
    return work / "quant" / quantize.QUANT_FILE, cfgs


def forced_target(quant: Path, unpruned_total: int, at_least: int) -> int:
    """Unpruned total - the predicted saving of 1.5 x at_least pruned values (k = 1)."""
    tensors, meta = compress.load_quant(quant)
    codes, cands = compress.candidates(tensors, meta, compress.load_hdiag(quant.parent / quantize.HDIAG))
    n = min(int(at_least * 1.5), cands.total)
    P = prune.Entropy(codes, cands)
    return unpruned_total - max(int(P(0) - P(n)), 1)


def configs(a: argparse.Namespace) -> dict[str, config.Section]:
    """{section: checked dataclass}: the --profile's, with --small's model and the evaluate arguments."""
    cfgs = overrides.load(a.profile)
    ev = cfgs["evaluate"]
    changed = {
        "model": dataclasses.replace(cfgs["model"], **(overrides.SMALL_MODEL if a.small else {})),
        "quantize": dataclasses.replace(cfgs["quantize"], device=a.device,
                                        **({"passthrough_max_numel": 512} if a.small else {})),
        "evaluate": dataclasses.replace(ev, device=a.device, stride=a.stride, context=a.context or ev.context,
                                        max_tokens=a.max_tokens, batch_seqs=a.batch_seqs or ev.batch_seqs,
                                        nproc_per_node=1, ttt_enabled=False)}
    return {**cfgs, **{s: config.check(c, "the bench's arguments") for s, c in changed.items()}}


def run(a: argparse.Namespace) -> dict:
    cfgs = configs(a)
    mcfg, qcfg, ccfg, ecfg = cfgs["model"], cfgs["quantize"], cfgs["compress"], cfgs["evaluate"]
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_quant_loop_"))
    if a.data:
        shards, tok = Path(a.data), Path(a.tokenizer)
    else:
        shards, tok = synthetic_data(work / "data", mcfg.vocab_size, max(a.max_tokens, ecfg.context) + 1)
    if a.train_dir:
        train_dir, setup_s = Path(a.train_dir), 0.0
    else:
        train_dir, setup_s = timed(synthetic_train_dir, work / "train", mcfg, cfgs["train"], read_tokenizer_meta(tok))
    q, quantize_s = timed(quantize.run, qcfg, train_dir, work / "quant", work / "quant.json")
    script = pack.build_script(ROOT, cfgs)
    quant = work / "quant" / quantize.QUANT_FILE
    plain, unpruned_s = timed(compress.build, dataclasses.replace(ccfg, prune=False), script, quant, work / "final0",
                              work / "size0.json")
    target = forced_target(quant, plain["total_bytes"], a.prune_at_least)
    size, compress_s = timed(compress.build, dataclasses.replace(ccfg, target_bytes=target), script, quant,
                             work / "final", work / "size.json")
    paths = evaluate.Paths(work / "final" / artifact.MODEL_FILE, shards, tok, work / "eval.json")
    ev, evaluate_s = timed(evaluate.run, ecfg, paths, progress=False)
    weights, _ = train_files.load_weights(train_dir / train_files.MODEL_FILE)
    return {
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": ev["device"], "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "torch": torch.__version__, "python": platform.python_version(),
        "model": {"source": str(a.train_dir) if a.train_dir else "synthetic",
                  "params": sum(t.numel() for t in weights.values()),
                  "config": "small" if a.small else overrides.resolve(a.profile)[0]},
        "data": str(a.data) if a.data else "synthetic",
        "seconds": {"setup": round(setup_s, 3), "quantize": round(quantize_s, 3),
                    "compress_unpruned": round(unpruned_s, 3), "compress_pruned": round(compress_s, 3),
                    "prune_search": size["prune_seconds"], "evaluate": round(evaluate_s, 3),
                    "evaluate_sliding": ev["sliding_seconds"], "evaluate_nonsliding": ev["nonsliding_seconds"],
                    "evaluate_compile": ev["compile_seconds"],
                    "quantize_compress_evaluate": round(quantize_s + compress_s + evaluate_s, 3)},
        "pruned_values": size["pruned_values"], "prune_at_least": a.prune_at_least,
        "prune_candidates": size["prune_candidates"], "prune_slack_bytes": ccfg.prune_slack_bytes,
        "real_compressions": size["real_compressions"], "prune_compressions": size["prune_compressions"],
        "prune_probes": size.get("prune_probes", []),
        "bytes": {"raw": size["raw_bytes"], "unpruned_total": plain["total_bytes"], "target": target,
                  "total": size["total_bytes"], "model": size["model_bytes"], "code": size["code_bytes"],
                  "codec": size["codec"], **{k: v for k, v in plain.items() if k in ("lzma_bytes", "zstd_bytes",
                                                                                   "brotli_bytes")}},
        "evaluate": {"context": ecfg.context, "stride": ecfg.stride, "max_tokens": ecfg.max_tokens,
                     "batch_seqs": ecfg.batch_seqs, "windows": ev["windows"],
                     "scored_tokens": ev["scored_tokens"], "val_bpb": ev["val_bpb"],
                     "val_bpb_nonsliding": ev["val_bpb_nonsliding"]},
        "gptq_rtn_error_ratio": q["gptq_rtn_error_ratio"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    overrides.add_profile_argument(ap, "its model (without --train-dir) and post-training params")
    ap.add_argument("--train-dir", help="a trained artifacts/train folder (model.pgt, hessians.pgt)")
    ap.add_argument("--data", help="a folder of fineweb_val_*.bin shards (with --tokenizer)")
    ap.add_argument("--tokenizer", default="data/tokenizer", help="prepare's tokenizer folder (tokenizer.json, byte tables)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--context", type=int, default=0, help="evaluation context (0: the profile's)")
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--batch-seqs", type=int, default=0, help="evaluation windows per batch (0: the profile's)")
    ap.add_argument("--max-tokens", type=int, default=0, help="validation targets scored (0: all)")
    ap.add_argument("--prune-at-least", type=int, default=100_000)
    ap.add_argument("--small", action="store_true", help="a micro model (for the test)")
    ap.add_argument("--work", help="scratch folder (default: a new temp folder)")
    a = ap.parse_args(argv)
    result = run(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
