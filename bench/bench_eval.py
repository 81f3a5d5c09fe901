"""Time the headline evaluation: stride-64 sliding val_bpb over the official validation prefix.

GPU:  python bench/bench_eval.py --tokens PATH/fineweb_val_000000.bin --out bench_eval.json
      (the RECORD profile's model, random init; its context 2048, stride 64, 32 windows
      per forward, bf16 autocast + torch.compile; target <= 10 s for the 1.04 M-token prefix)
CPU:  python bench/bench_eval.py --small --out /tmp/bench_eval_small.json   (smoke test: the
      tiny profile's model and context 256, the 20k-token test fixture)

Times pgolf.shared.bpb.eval_sliding exactly as the evaluate stage calls it, after one untimed warm-up
pass on a short prefix (compiles the fixed-shape graph; its time is reported as compile_seconds),
and optionally the non-sliding pass too. Writes a JSON with the GPU name, torch / triton versions,
seconds, tokens/s and the window count. Byte counts use synthetic tables (timing only).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import overrides  # noqa: E402
from bench.timing import timed  # noqa: E402
from pgolf.shared import bpb  # noqa: E402
from pgolf.shared.byte_tables import ByteTables  # noqa: E402
from pgolf.shared.shards import read_shard  # noqa: E402
from pgolf.shared.io import write_json  # noqa: E402
from pgolf.shared.model import GPT  # noqa: E402

OFFICIAL = ROOT.parent / "shared/data/fineweb_sp1024_val_prefix/fineweb_val_000000.bin"  # beside the checkout
FIXTURE = ROOT / "tests/fixtures/fineweb_val_prefix20k.bin"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--tokens", type=Path, default=None, help="a fineweb_val_*.bin shard (default: the official "
                    "prefix if present, else the test fixture)")
    ap.add_argument("--small", action="store_true", help="CPU smoke test: tiny model, context 256")
    ap.add_argument("--context", type=int, default=None, help="default: the profile's evaluate.context")
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--batch-seqs", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=0, help="score only the first N targets (0 = all)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--nonsliding", action="store_true", help="also time the non-sliding pass")
    ap.add_argument("--fused-mlp", action="store_true", help="use the Triton fused MLP in the forward")
    return ap.parse_args()


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        tv = None
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "cuda": torch.version.cuda if cuda else None}


def synthetic_tables(vocab: int) -> ByteTables:
    """Byte tables for timing only: every token 2 bytes, no leading space, no boundary tokens."""
    none = torch.zeros(vocab, dtype=torch.bool)
    return ByteTables(torch.full((vocab,), 2), none, none.clone())


def main() -> int:
    a = parse_args()
    device = torch.device("cpu" if a.small or not torch.cuda.is_available() else "cuda")
    cfgs = overrides.load("tiny" if a.small else "record")
    cfg = cfgs["model"]
    context = a.context or cfgs["evaluate"].context
    path = a.tokens or (OFFICIAL if OFFICIAL.is_file() and not a.small else FIXTURE)
    tokens = read_shard(path)
    if a.max_tokens:
        tokens = tokens[:a.max_tokens + 1]
    torch.manual_seed(0)
    model = GPT(cfg, train_seq_len=context).to(device).eval()
    model.use_fused_mlp = a.fused_mlp
    tables = synthetic_tables(cfg.vocab_size)
    compile_ = not a.no_compile and device.type == "cuda"
    kw = dict(context=context, stride=a.stride, batch_seqs=a.batch_seqs, device=device, compile=compile_)

    # warm-up: compiles the one (batch_seqs, context) graph
    _, compile_s = timed(bpb.eval_sliding, model, tokens[:context + a.stride * a.batch_seqs + 1], tables,
                         sync_device=device, **kw)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    ev, secs = timed(bpb.eval_sliding, model, tokens, tables, sync_device=device, **kw)
    out = {**versions(), "device": str(device), "tokens_file": str(path), "model": "tiny" if a.small else "record",
           "params": model.num_params(), "context": context, "stride": a.stride, "batch_seqs": a.batch_seqs,
           "compile": compile_, "fused_mlp": a.fused_mlp, "compile_seconds": round(compile_s, 3),
           "seconds": round(secs, 3), "scored_tokens": ev["scored_tokens"],
           "tokens_per_second": round(ev["scored_tokens"] / secs, 1), "windows": ev["windows"],
           "forward_tokens_per_second": round(ev["windows"] * context / secs, 1),
           "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None}
    if a.nonsliding:
        flat, secs_flat = timed(bpb.eval_nonsliding, model, tokens, tables, context, a.batch_seqs, device,
                                compile=compile_, sync_device=device)
        out["nonsliding_seconds"] = round(secs_flat, 3)
        out["nonsliding_tokens"] = flat["tokens"]
    write_json(a.out, out)
    print(f"bench_eval: {out['model']} model on {out['gpu'] or 'cpu'}: {ev['scored_tokens']:,} tokens, "
          f"{ev['windows']:,} windows (context {context}, stride {a.stride}) in {secs:.2f} s = "
          f"{out['tokens_per_second']:,.0f} tokens/s; compile/warm-up {compile_s:.1f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
