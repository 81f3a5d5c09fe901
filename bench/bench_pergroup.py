"""Artifact bytes and seconds of the compress modes on a record-scale quantized model: today's flat
layout with lzma (chunked, the default), zstd and brotli, the grouped layout (compress.layout grouped,
lzma and brotli), and compress.layout pergroup (pgolf.compress.pergroup: each group by its best
codec; the per-piece table is recorded), its rows by compress.row_order pca and l1, and l1 with
compress.transpose_groups (each group stored column by column, as PR #2135 stores its sorted tensors).

    python -m bench.bench_pergroup --out bench/results/pergroup_cpu.json [--layouts pergroup]

The quantized file is bench/bench_quant_loop.py's synthetic record-scale model (--profile, the record's
by default: trained-like weights and random Hessians, not a trained model) run through pgolf's
quantize stage on the CPU, cached in --quant-cache; or, with --quant FILE --model TEXT, the quant.pgt of a
trained model (TEXT says which run made it). One run per row (no repeats); seconds are wall
time of serialize + compress, and of decompress + deserialize. `--probe N`: one pruning probe of
the per-group body (the first N ±1 candidates zeroed, as pgolf.compress.compress prunes), compressed
by every codec per piece, then by each piece's codec of the unpruned body alone (`like`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path

from bench import overrides
from bench.timing import timed
from pgolf.compress import artifact, compress, pergroup, prune
from pgolf.config import ConfigError
from pgolf.quantize import quantize


def build_quant(cache: Path, profile: str) -> Path:
    """Synthetic record-scale model -> quantize.run; quant.pgt cached under `cache`."""
    path = cache / "quant" / quantize.QUANT_FILE
    if path.is_file():
        return path
    import shutil

    from bench.bench_quant_loop import synthetic_quant

    work = Path(tempfile.mkdtemp(prefix="bench_pergroup_"))
    quant, _ = synthetic_quant(work, profile)
    shutil.copytree(quant.parent, cache / "quant", dirs_exist_ok=True)
    return path


def row(tensors: dict, meta: dict, layout: str, codec: str, cfg, order: str = "pca", transpose: bool = False) -> tuple[dict, bytes]:
    """One layout and codec: its JSON row (bytes, seconds both ways) and the compressed file."""
    cfg = dataclasses.replace(cfg, layout=layout, row_order=order, transpose_groups=transpose)

    def pack():
        return artifact.compress(artifact.serialize(tensors, meta, cfg), codec, cfg)

    blob, seconds = timed(pack)
    (back, _), load_s = timed(artifact.loads_artifact, blob)
    assert list(back) == list(tensors) and all(back[k].equal(v) for k, v in tensors.items())  # round trip
    out = {"layout": layout, "row_order": order if layout != "flat" else None,
           "transpose_groups": transpose if layout != "flat" else None, "codec": codec, "bytes": len(blob),
           "seconds": round(seconds, 2), "load_seconds": round(load_s, 2)}
    if codec == "pergroup":
        out["pieces"] = pergroup.describe(blob[artifact.HEADER_BYTES:])
        out["codecs_tried"] = pergroup.available(cfg.pergroup_codecs)
    print(json.dumps({k: v for k, v in out.items() if k != "pieces"}), flush=True)
    return out, blob


def probe(tensors: dict, meta: dict, hdiag: dict, cfg, n: int, first: bytes | None = None) -> dict:
    """Seconds of one pruning probe of the pca-ordered per-group body, every codec per piece against
    each piece's codec of the unpruned file `first` (pergroup.encode's `like`; compressed here when
    the rows did not), and the bytes of both."""
    cfg = dataclasses.replace(cfg, layout="pergroup", row_order="pca", transpose_groups=False)
    if first is None:
        first = artifact.compress(artifact.serialize(tensors, meta, cfg), "pergroup", cfg)
    codes, cands = compress.candidates(tensors, meta, hdiag)
    raw = artifact.serialize({**tensors, **prune.apply(codes, cands, n)}, meta, cfg)
    every, every_s = timed(artifact.compress, raw, "pergroup", cfg)
    reused, reused_s = timed(artifact.compress, raw, "pergroup", cfg, like=first)
    assert artifact.decompress(reused)[1] == raw  # round trip
    out = {"pruned_values": n, "unpruned_bytes": len(first), "every_codec": {"bytes": len(every), "seconds": round(every_s, 2)},
           "like_unpruned": {"bytes": len(reused), "seconds": round(reused_s, 2)}, "ratio": round(reused_s / every_s, 3)}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="record")
    ap.add_argument("--quant-cache", type=Path, default=Path(tempfile.gettempdir()) / "pgolf_bench_pergroup")
    ap.add_argument("--quant", type=Path, help="a trained model's quant.pgt instead of the synthetic one")
    ap.add_argument("--model", default="", help="with --quant: which run trained and quantized it")
    ap.add_argument("--layouts", default="flat,grouped,pergroup", help="the rows of these layouts only")
    ap.add_argument("--probe", type=int, default=0, help="also time one pruning probe of this many ±1 values")
    ap.add_argument("--codecs", help="compress.pergroup_codecs for the per-group rows (e.g. lzma,zstd,brotli)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    layouts = set(args.layouts.split(","))
    if not layouts or layouts - {"flat", "grouped", "pergroup"}:
        ap.error(f"--layouts {args.layouts}: a comma list of flat, grouped, pergroup")
    if args.quant and not (args.quant.is_file() and args.model):
        ap.error(f"--quant {args.quant}: needs an existing quant.pgt file and --model saying where it came from")
    quant, build_s = (args.quant, 0.0) if args.quant else timed(build_quant, args.quant_cache, args.profile)
    tensors, meta = compress.load_quant(quant)
    cfg = overrides.load(args.profile)["compress"]
    if args.codecs:
        cfg = dataclasses.replace(cfg, pergroup_codecs=tuple(args.codecs.split(",")))
        try:
            cfg.check()
        except ConfigError as e:
            ap.error(f"--codecs {args.codecs}: {e}")
    packed = [(layout, order, *row(tensors, meta, layout, codec, cfg, order, transpose))
              for layout, codec, order, transpose in (
                  ("flat", "lzma", "pca", False), ("flat", "zstd", "pca", False), ("flat", "brotli", "pca", False),
                  ("grouped", "lzma", "pca", False), ("grouped", "brotli", "pca", False),
                  ("pergroup", "pergroup", "pca", False), ("pergroup", "pergroup", "l1", False),
                  ("pergroup", "pergroup", "l1", True)) if layout in layouts]
    synthetic = (f"synthetic {args.profile}-profile model (bench.bench_quant_loop.synthetic_train_dir: "
                 "trained-like weights, random Hessians; no trained record-size model was available), "
                 "quantized by pgolf.quantize on the CPU")
    result = {"model": args.model or synthetic,
              "quant_build_seconds": round(build_s, 1), "tensors": len(tensors),
              "compress": {k: v for k, v in dataclasses.asdict(cfg).items()
                           if k in ("lzma_preset", "lzma_chunk_bytes", "zstd_level", "brotli_quality",
                                    "brotli_window", "pergroup_codecs", "lrzip_level", "threads")},
              "codecs_here": pergroup.available(cfg.pergroup_codecs),
              "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
              "rows": [r for _, _, r, _ in packed]}
    if args.probe:
        hdiag = compress.load_hdiag(quant.parent / compress.HDIAG)
        first = next((b for layout, order, r, b in packed
                      if (layout, order, r["transpose_groups"]) == ("pergroup", "pca", False)), None)
        result["probe"] = probe(tensors, meta, hdiag, cfg, args.probe, first)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
