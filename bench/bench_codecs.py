"""Codec parallelism on the record-scale artifact body: zstd-22 single-threaded vs its
multithreaded mode (thread counts, job sizes; are the frames equal across thread counts?), and
lzma (pgolf's filters) as one stream vs 2/4/8/16 independent chunks, and pgolf's chunked zstd-22
(compress.zstd_chunk_bytes; part zstd_frames). Writes one JSON to --out.

    python bench/bench_codecs.py --out bench/results/codecs_cpu.json              # everything
    python bench/bench_codecs.py --out bench/results/codecs_cpu.json --only zstd  # one part (merged into --out)

The body is what `pgolf.compress.artifact.compress` compresses: `serialize` of the quantized tensors of
bench/bench_quant_loop.py's synthetic record-scale model (--profile, the record's by default; the
quantize stage run on it), with the tensorfile header moved behind the arrays (`artifact.move_head_last`). It is
built once (~2 minutes on 2 cores) and cached in --raw; later runs read the cache.

Every measurement is one run (no repeats: lzma-9 and zstd-22 of 27.5 MB take ~40 s each on
one core); "seconds" is wall time, "cpu_seconds" the process's CPU time over the same span (all
threads), so cpu / wall ~ the cores actually used. The box may be shared: the JSON records the
load average before each part.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import lzma
import os
import platform
import struct
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zstandard  # noqa: E402

from bench import overrides  # noqa: E402
from bench.timing import Stopwatch, timed  # noqa: E402
from pgolf import config  # noqa: E402
from pgolf.compress import artifact, codecs  # noqa: E402

MiB = 1 << 20


def build_body(raw_path: Path, profile: str) -> bytes:
    """Synthetic record-scale model -> quantize.run -> artifact.serialize -> move_head_last, cached in raw_path."""
    from bench.bench_quant_loop import synthetic_quant
    from pgolf.compress import compress

    quant, cfgs = synthetic_quant(Path(tempfile.mkdtemp(prefix="bench_codecs_")), profile)
    tensors, meta = compress.load_quant(quant)
    body = artifact.move_head_last(artifact.serialize(tensors, meta, cfgs["compress"]))
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    raw_path.write_bytes(body)
    return body


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def zstd_part(body: bytes, level: int, splits: list[tuple[int, int]], rows: list[dict] | None = None) -> dict:
    """Single-threaded (threads=0) vs the multithreaded mode (threads 1, 2) at the default job size
    and at explicit (job size MiB, overlap log) splits; `rows`: earlier runs to append to (the
    baselines are then not rerun)."""
    fresh = not rows
    rows = list(rows or [])

    def one(label: str, threads: int, job_mib: int = 0, overlap_log: int = 0) -> None:
        if job_mib or overlap_log:
            p = zstandard.ZstdCompressionParameters.from_level(
                level, source_size=len(body), threads=threads, job_size=job_mib * MiB, overlap_log=overlap_log,
                write_content_size=True, write_checksum=False)
            c = zstandard.ZstdCompressor(compression_params=p)
        else:
            c = zstandard.ZstdCompressor(level=level, threads=threads, write_content_size=True, write_checksum=False)
        with Stopwatch() as sw:
            out = c.compress(body)
        ok = zstandard.ZstdDecompressor().decompress(out) == body
        rows.append({"label": label, "threads": threads, "job_size_mib": job_mib, "overlap_log": overlap_log,
                     "bytes": len(out), "sha256_16": sha(out), **sw.as_dict(2),
                     "roundtrip": ok, "load_before": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    if fresh:
        one("single-threaded (threads=0)", 0)
        for t in (1, 2):
            one(f"mt threads={t}, default job size", t)
    for job, ov in splits:
        for t in (1, 2):
            one(f"mt threads={t}, job {job} MiB, overlap_log {ov or 'default'}", t, job, ov)
    base = rows[0]["bytes"]
    for r in rows:
        r["delta_bytes_vs_single"] = r["bytes"] - base
    groups: dict[tuple, set] = {}
    for r in rows:
        if r["threads"] >= 1:
            groups.setdefault((r["job_size_mib"], r["overlap_log"]), set()).add(r["sha256_16"])
    return {"level": level, "runs": rows,
            "mt_frames_equal_across_threads": {f"job {j} MiB, overlap_log {o}": len(s) == 1
                                               for (j, o), s in groups.items()},
            "st_equals_mt": {r["label"]: r["sha256_16"] == rows[0]["sha256_16"] for r in rows[1:]}}


def zstd_frames_part(body: bytes, level: int, frame_bytes: list[int]) -> dict:
    """pgolf's chunked zstd (`artifact.compress` with compress.zstd_chunk_bytes = N, codec id 5:
    independent frames of N raw bytes, every core) for each N of `frame_bytes`, 0 meaning one
    frame; bytes are the file less its 12-byte header (the chunk table included), at 1 and 2
    threads (the files must be equal)."""
    cfg = dataclasses.replace(config.CompressConfig(), zstd_level=level)
    plain = artifact.move_head_first(body, "body")  # compress() moves the header itself
    rows = []
    for n in frame_bytes:
        for t in (1, 2):
            load = round(os.getloadavg()[0], 2)
            with Stopwatch() as sw:
                out = artifact.compress(plain, "zstd", dataclasses.replace(cfg, zstd_chunk_bytes=n, threads=t))
            ok = artifact.decompress(out) == ("zstd", plain)
            rows.append({"zstd_chunk_bytes": n, "threads": t, "bytes": len(out) - artifact.HEADER_BYTES,
                         "sha256_16": sha(out), **sw.as_dict(2), "roundtrip": ok, "load_before": load})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    same: dict[int, set] = {}
    for r in rows:
        same.setdefault(r["zstd_chunk_bytes"], set()).add(r["sha256_16"])
    return {"level": level, "via": "pgolf.compress.artifact.compress", "runs": rows,
            "files_equal_across_threads": {str(k): len(v) == 1 for k, v in same.items()}}


def lzma_chunks(body: bytes, k: int, filters: list[dict], workers: int) -> list[bytes]:
    """`body` cut into k equal byte ranges, each its own raw LZMA2 stream, `workers` at a time."""
    step = -(-len(body) // k)
    parts = [body[i:i + step] for i in range(0, len(body), step)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: lzma.compress(p, format=lzma.FORMAT_RAW, filters=filters), parts))


def lzma_part(body: bytes, preset: int, chunk_counts: list[int], chunk_bytes: list[int], workers: int,
              rows: list[dict] | None = None) -> dict:
    """One stream vs `chunk_counts` equal pieces (this module's split, `workers` threads), then
    pgolf's own chunked codec (`artifact.compress` with compress.lzma_chunk_bytes, the file bytes
    less the 12-byte file header) at 1 and 2 threads; `rows`: earlier runs to append to."""
    cfg = dataclasses.replace(config.CompressConfig(), lzma_preset=preset)
    filters = codecs._lzma_filters(cfg)  # the codec's own filters (pgolf.compress.codecs)
    fresh = not rows
    rows = list(rows or [])
    for k in ([1] + chunk_counts) if fresh else chunk_counts:
        with Stopwatch() as sw:  # the pool's start and end included, as before
            outs = lzma_chunks(body, k, filters, 1 if k == 1 else workers)
        total = sum(len(o) for o in outs)
        rows.append({"chunks": k, "workers": 1 if k == 1 else workers, "bytes": total,
                     "bytes_with_chunk_table": total + (4 * k if k > 1 else 0), **sw.as_dict(2),
                     "load_before": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for size in chunk_bytes:
        for t in (1, 2):
            c = dataclasses.replace(cfg, lzma_chunk_bytes=size, threads=t)
            load = round(os.getloadavg()[0], 2)
            # compress() moves the header itself: undo the bench's move_head_last, so the body is the same
            plain = artifact.move_head_first(body, "body")
            with Stopwatch() as sw:
                out = artifact.compress(plain, "lzma", c)
            (k,) = struct.unpack("<I", out[artifact.HEADER_BYTES:artifact.HEADER_BYTES + 4])
            rows.append({"chunks": k, "lzma_chunk_bytes": size, "workers": t, "via": "pgolf.compress.artifact.compress",
                         "bytes": len(out) - artifact.HEADER_BYTES - 4 * (k + 1),
                         "bytes_with_chunk_table": len(out) - artifact.HEADER_BYTES, "sha256_16": sha(out),
                         **sw.as_dict(2), "load_before": load})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]["bytes"]
    for r in rows:
        r["delta_bytes_vs_one_stream"] = r["bytes_with_chunk_table"] - base
        r["delta_pct"] = round(100 * r["delta_bytes_vs_one_stream"] / base, 3)
    same: dict[int, set] = {}
    for r in rows:
        if "lzma_chunk_bytes" in r:
            same.setdefault(r["lzma_chunk_bytes"], set()).add(r["sha256_16"])
    return {"filters": repr(filters), "runs": rows,
            "files_equal_across_threads": {str(k): len(v) == 1 for k, v in same.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--raw", type=Path, default=Path(tempfile.gettempdir()) / "pgolf_record_body.bin",
                    help="cache of the raw body (built when missing)")
    overrides.add_profile_argument(ap, "the model and params of the synthetic body")
    ap.add_argument("--only", choices=("zstd", "lzma", "zstd_frames"), help="one part; merged into an existing --out")
    ap.add_argument("--zstd-frame-bytes", default="0,65536,131072,262144,1048576",
                    help="compress.zstd_chunk_bytes values (0 = one frame) run through pgolf.compress.artifact.compress")
    ap.add_argument("--zstd-splits", default="4:0,4:6,8:0,8:6,16:8",
                    help="explicit JOB_MIB:OVERLAP_LOG pairs (overlap log 0: zstd's default, 9 at level 22 = the "
                         "whole window; zstd raises a job smaller than its overlap to the overlap)")
    ap.add_argument("--zstd-append", action="store_true",
                    help="add --zstd-splits runs to the zstd runs already in --out (no baseline rerun)")
    ap.add_argument("--lzma-chunks", default="2,4,8,16,32,64,128,256")
    ap.add_argument("--lzma-chunk-bytes", default="131072,262144,1048576",
                    help="compress.lzma_chunk_bytes values run through pgolf.compress.artifact.compress")
    ap.add_argument("--lzma-append", action="store_true",
                    help="add these runs to the lzma runs already in --out (no one-stream rerun)")
    a = ap.parse_args(argv)
    if a.raw.is_file():
        body, build_s = a.raw.read_bytes(), None
    else:
        body, build_s = timed(build_body, a.raw, a.profile)
    result = json.loads(a.out.read_text()) if a.only and a.out.is_file() else {}
    result.update({
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))},
        "python": platform.python_version(), "python_zstandard": zstandard.__version__,
        "zstd_library": ".".join(map(str, zstandard.ZSTD_VERSION)), "zstandard_backend": zstandard.backend,
        "body": {"bytes": len(body), "sha256_16": sha(body), "source": "synthetic record-scale model "
                 "(bench_quant_loop.synthetic_train_dir -> quantize.run -> artifact.serialize, header last)"},
    })
    if build_s is not None:
        result["body"]["build_seconds"] = round(build_s, 2)
    if a.only in (None, "zstd"):
        splits = [tuple(int(v) for v in x.split(":")) for x in a.zstd_splits.split(",") if x]
        earlier = result.get("zstd", {}).get("runs") if a.zstd_append else None
        result["zstd"] = zstd_part(body, 22, splits, earlier)
    if a.only in (None, "lzma"):
        earlier = result.get("lzma", {}).get("runs") if a.lzma_append else None
        result["lzma"] = lzma_part(body, 9, [int(x) for x in a.lzma_chunks.split(",") if x],
                                   [int(x) for x in a.lzma_chunk_bytes.split(",") if x], os.cpu_count() or 1, earlier)
    if a.only in (None, "zstd_frames"):
        result["zstd_frames"] = zstd_frames_part(body, 22, [int(x) for x in a.zstd_frame_bytes.split(",") if x])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
