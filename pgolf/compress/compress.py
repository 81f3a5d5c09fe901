"""The compress stage, owner of the byte budget: quantized tensors -> the submission artifact, the
packed script, selective ±1 pruning down to the target, the cap check.

This module writes `artifacts/final/` (model.ptz, train_gpt.py, code_files.json) and
`metrics/size.json` (paths and names: pgolf.shared.layout; model.ptz's name: pgolf.compress.artifact). It
serializes the quantized tensors in the artifact layout (pgolf.compress.artifact), compresses with lzma
and zstd (and brotli with compress.brotli) concurrently and keeps the smallest (or
compress.codec; `pick`); compress.layout pergroup instead compresses each group by its own best
codec (pgolf.compress.pergroup, the one "codec" pergroup). Code bytes are the bytes of the packed
`train_gpt.py` (pgolf.compress.pack), as the challenge counts them: model + that script against
compress.cap_bytes. The older count (the raw evaluation files of pgolf.compress.pack.CODE_FILES) stays
as the extra key `code_bytes_eval_files_raw`.

Pruning (compress.prune, pgolf.compress.prune): when model + code bytes exceed compress.target_bytes, the
cheapest ±1 int6 codes (cost s_i^2 H_jj, with the Hessian diagonals quantize saved in
artifacts/quant/hdiag.pgt) are zeroed. The codec is chosen on the unpruned body; the search then
probes with that codec alone (`<codec>_bytes` of the other codecs stay the unpruned sizes; a
per-group body keeps each piece's codec of the unpruned one, pgolf.compress.pergroup.encode's `like`), each
probe a real compression, placed by an entropy predictor (pgolf.compress.prune.Entropy). The file written
is the probe that fitted, so `model_bytes` is its real size.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.shared import layout, tensorfile
from pgolf.compress import artifact, prune
from pgolf.config import CompressConfig
from pgolf.shared.io import atomic_write_bytes, file_sha256, staged_dir, write_json
from pgolf.quantize.quantize import HDIAG, HDIAG_KIND, KIND as QUANT_KIND, QUANT_FILE  # quantize's outputs


class CompressError(ValueError):
    pass


def load_quant(quant: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, header = tensorfile.load(quant, kind=QUANT_KIND)
    for key in ("model", "train_seq_len", "tokenizer", "quant"):
        if key not in header["meta"]:
            raise CompressError(f"{quant}: meta lacks {key!r} (written by an older quantize stage?)")
    return tensors, header["meta"]


def load_hdiag(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CompressError(f"{path}: not found (pruning needs the Hessian diagonals; rerun the quantize stage)")
    return tensorfile.load(path, kind=HDIAG_KIND)[0]


# ----------------------------------------------------------------------------- the codec choice


def codec_names(cfg: CompressConfig) -> tuple[str, ...]:
    """The codecs a run computes (and "auto" chooses among): lzma and zstd, plus brotli when
    compress.brotli is on or compress.codec forces it."""
    if cfg.layout == "pergroup":  # one file: every group by its own best codec (pgolf.compress.pergroup)
        return ("pergroup",)
    return ("lzma", "zstd") + (("brotli",) if cfg.brotli or cfg.codec == "brotli" else ())


def compress_all(raw: bytes, cfg: CompressConfig) -> dict[str, bytes]:
    """Every codec's artifact file of the body `raw` (`codec_names(cfg)`), computed concurrently:
    the coders release the GIL, so this divides the wall time of a record-size body."""
    names = codec_names(cfg)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = {c: pool.submit(artifact.compress, raw, c, cfg) for c in names}
        return {c: f.result() for c, f in futures.items()}


def sizes(raw: bytes, cfg: CompressConfig) -> dict[str, int]:
    """Compressed file size per codec of `codec_names(cfg)`: {"lzma": n, "zstd": n, ...} (header included)."""
    return {c: len(b) for c, b in compress_all(raw, cfg).items()}


def pick(blobs: dict[str, bytes], cfg: CompressConfig) -> str:
    """The codec choice: cfg.codec "auto" keeps the smallest of `blobs` (ties by name), else the forced one."""
    if cfg.codec == "auto":
        return min(blobs, key=lambda c: (len(blobs[c]), c))
    return cfg.codec


def choose(raw: bytes, cfg: CompressConfig) -> tuple[str, bytes]:
    """(codec, file bytes) by `pick`: every codec for "auto", only the forced one otherwise."""
    if cfg.codec == "auto":
        blobs = compress_all(raw, cfg)
        codec = pick(blobs, cfg)
        return codec, blobs[codec]
    return cfg.codec, artifact.compress(raw, cfg.codec, cfg)


# ----------------------------------------------------------------------------- pruning


@dataclass
class Pruned:
    tensors: dict[str, torch.Tensor]  # the quantized tensors with the pruned codes zeroed
    blob: bytes  # the artifact file of the answer (a real compression)
    n: int
    candidates: int
    cost: float  # sum of s^2 H_jj of the pruned values
    probes: list[tuple[int, int]]  # (n, total bytes) in the order measured
    compressions: int  # real compressions made by the search (size(0) not counted: the codec choice made it)
    seconds: float


def candidates(tensors: dict[str, torch.Tensor], meta: dict,
               hdiag: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], prune.Candidates]:
    """The int6 codes (`name.q` -> (R, C) int8) and their ±1 pruning candidates in cost order."""
    names = [n for n, info in meta["quant"].items() if isinstance(info, dict) and info.get("type") == "int6"]
    codes = {f"{n}.q": tensors[f"{n}.q"] for n in names}
    return codes, prune.collect(codes, {f"{n}.q": tensors[f"{n}.scale"] for n in names},
                                {f"{n}.q": hdiag.get(n) for n in names})


def prune_to_target(tensors: dict[str, torch.Tensor], meta: dict, hdiag: dict[str, torch.Tensor],
                    cfg: CompressConfig, codec: str, code: int, unpruned: bytes) -> Pruned:
    """Zero the cheapest ±1 int6 codes until serialize + `codec` + `code` bytes <= compress.target_bytes
    (pgolf.compress.prune's contract for compress.prune_slack_bytes); PruneError when unreachable."""
    t0 = time.perf_counter()
    codes, cands = candidates(tensors, meta, hdiag)
    blobs = {0: unpruned}

    def size_of(n: int) -> int:
        if n not in blobs:
            pruned = {**tensors, **prune.apply(codes, cands, n)}  # same keys, same order as quant.pgt
            blobs[n] = artifact.compress(artifact.serialize(pruned, meta, cfg), codec, cfg,
                                         like=unpruned)
        return len(blobs[n]) + code

    res = prune.search(size_of, cands.total, cfg.target_bytes, prune.Entropy(codes, cands), cfg.prune_slack_bytes)
    return Pruned({**tensors, **prune.apply(codes, cands, res.n)}, blobs[res.n], res.n, cands.total,
                  cands.cost_of_first(res.n), res.probes, len(blobs) - 1, time.perf_counter() - t0)


def _prune_metrics(p: Pruned | None, cfg: CompressConfig) -> dict:
    if p is None:
        return {"pruned_values": 0, "prune_candidates": None, "prune_compressions": 0, "prune_seconds": 0.0,
                "target_bytes": cfg.target_bytes}
    return {"pruned_values": p.n, "prune_candidates": p.candidates, "prune_cost": p.cost,
            "prune_compressions": p.compressions, "prune_seconds": round(p.seconds, 3),
            "prune_probes": [{"n": n, "total_bytes": s} for n, s in p.probes], "target_bytes": cfg.target_bytes}


# ----------------------------------------------------------------------------- the stage


def build(cfg: CompressConfig, script: bytes, quant: Path = layout.QUANT / QUANT_FILE, final: Path = layout.FINAL,
          metrics: Path = layout.SIZE_METRICS,
          eval_files: list[dict] | None = None) -> dict:
    """Write the artifact folder (model.ptz, the packed script, code_files.json) and metrics/size.json.

    `script` is the packed train_gpt.py whose bytes count as code; `eval_files` the raw
    evaluation files ([{"path", "bytes"}], pgolf.compress.pack.code_files) recorded as the extra count.
    """
    t0 = time.perf_counter()
    quant = Path(quant)
    tensors, meta = load_quant(quant)
    raw = artifact.serialize(tensors, meta, cfg)
    blobs = compress_all(raw, cfg)
    codec = pick(blobs, cfg)
    blob, code, pruned = blobs[codec], len(script), None
    if cfg.prune and len(blob) + code > cfg.target_bytes:
        pruned = prune_to_target(tensors, meta, load_hdiag(quant.parent / HDIAG), cfg, codec, code, blob)
        blob = pruned.blob
    model = len(blob)
    m = {"codec": codec, **{f"{c}_bytes": len(b) for c, b in blobs.items()}, "model_bytes": model,
         "code_bytes": code, "total_bytes": model + code, "cap_bytes": cfg.cap_bytes,
         "under_cap": model + code <= cfg.cap_bytes, "raw_bytes": len(raw),
         "code_count": f"packed {layout.SCRIPT_FILE}",
         "code_sha256": hashlib.sha256(script).hexdigest(), **_prune_metrics(pruned, cfg),
         "real_compressions": len(blobs) + (pruned.compressions if pruned else 0)}
    listing = {"script": layout.SCRIPT_FILE, "bytes": code, "sha256": m["code_sha256"]}
    if eval_files is not None:
        m["code_bytes_eval_files_raw"] = sum(f["bytes"] for f in eval_files)
        m["code_files"] = len(eval_files)
        listing["eval_files_raw"] = {"files": eval_files, "total": m["code_bytes_eval_files_raw"]}
    m["compress_seconds"] = round(time.perf_counter() - t0, 3)
    with staged_dir(final) as tmp:
        atomic_write_bytes(tmp / artifact.MODEL_FILE, blob)
        atomic_write_bytes(tmp / layout.SCRIPT_FILE, script)
        write_json(tmp / layout.CODE_FILES_FILE, listing)
    m["model_sha256"] = file_sha256(Path(final) / artifact.MODEL_FILE)
    write_json(metrics, m)
    return m


def summary_line(m: dict) -> str:
    others = ", ".join(f"{c} {m[f'{c}_bytes']:,}" for c in ("lzma", "zstd", "brotli", "pergroup") if f"{c}_bytes" in m)
    pruned = (f"; pruned {m['pruned_values']:,} ±1 values to meet {m['target_bytes']:,} in "
              f"{m['prune_compressions']} compressions, {m['prune_seconds']:.1f} s" if m["pruned_values"] else "")
    return (f"compress: {m['codec']} {m['model_bytes']:,} bytes ({others}, raw {m['raw_bytes']:,}) + packed "
            f"{layout.SCRIPT_FILE} {m['code_bytes']:,} = {m['total_bytes']:,} of {m['cap_bytes']:,}{pruned}")


def over_cap_message(m: dict) -> str:
    return (f"artifact is over the cap by {m['total_bytes'] - m['cap_bytes']:,} bytes ({m['total_bytes']:,} = model "
            f"{m['model_bytes']:,} + packed code {m['code_bytes']:,} > compress.cap_bytes {m['cap_bytes']:,})")
