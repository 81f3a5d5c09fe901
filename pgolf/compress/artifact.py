"""The submission artifact: packing layout, codecs, the counted code files, loading and dequantizing.

This module owns `artifacts/final/model.ptz`. A file is

    6 bytes  magic b"PGOLFZ"
    1 byte   FORMAT_VERSION
    1 byte   codec id (1 = lzma raw LZMA2 stream, 2 = zstd frame, 3 = brotli stream,
             4 = lzma in independent raw LZMA2 streams: uint32 count k, k uint32 stream lengths,
             the k streams; their outputs concatenated are the body; 5 = zstd in independent
             frames, the same table)
    4 bytes  uint32 CRC-32 of the uncompressed tensorfile (its JSON header is covered too;
             the container's own sha256 covers only the payload)
    rest     the compressed body

The body decompresses to `payload + head + uint32 len(head)` where `head + payload` is a
`pgolf.shared.tensorfile` container (the JSON header moved behind the arrays: zstd-22 gathers its
statistics on the first block, and the 14 KB JSON table of the tiny run up front cost it 5.3 %,
482,650 vs 458,236 bytes; lzma is indifferent). The container is of kind "artifact": JSON header
with the model config, tokenizer, quant table, a layout table and the payload sha256, then raw
little-endian arrays; loading never unpickles.

Packing layout (`serialize`), chosen by measurement (tests/test_artifact.py keeps the check):
  * every int8 tensor (int6/int8 codes) is zigzag-mapped to uint8 (0, -1, 1, -2, ... -> 0, 1, 2,
    3, ...), in its original shape; all codes come first, in the quantized file's tensor order;
  * all float tensors of one dtype (row scales, passthrough fp16/fp32) are concatenated and split
    into byte planes (all low bytes, then all high bytes), after the codes;
  * anything else (bool, wider ints) is stored as is, last.
Measured (compressed bytes, lzma preset 9 / zstd level 22, payload only) on synthetic GPTQ-like
codes (Laplacian per row, log-normal row and column spread, 0.9995 row clip, int6 in [-31, 31],
int8 tied embedding 1024 x D, fp16 scales and control vectors; 0.59M and 1.77M int6 values) and
on real GPTQ output (the quantize stage on the tiny profile's 150-step model: 0.59M int6 values):

    layout                                      synthetic 0.59M      synthetic 1.77M      GPTQ tiny run
                                                 lzma9    zstd22      lzma9     zstd22     lzma9   zstd22
    int8 per tensor, scales interleaved (ref)  509,144   518,125  1,295,207  1,297,379  459,874  459,831
    bit-packed 6 bits/value                    552,698   567,148  1,425,091  1,479,943  491,747  521,981
    int8, codes then floats                    508,400   503,814  1,294,138  1,275,653  458,291  457,809
    int8, codes then float byte planes         506,085   500,084  1,291,760  1,271,138  457,305  456,456
    zigzag, codes then float planes (kept)     505,275   500,020  1,291,385  1,270,956  457,948  456,081
    zigzag, transposed, planes                 503,932   499,950  1,288,072  1,270,881  458,763  457,832
    int8, transposed, planes                   505,010   499,992  1,288,663  1,271,043  457,758  469,986
    zigzag, grouped by kind, transposed        503,910   500,279  1,288,669  1,270,678  458,627  485,247
    int8, grouped by kind, planes              506,042   499,385  1,291,674  1,270,903  458,478  485,758

Bit packing loses 7-14 % (it breaks the byte alignment both coders model); fp16 scales
interleaved between code blocks cost zstd 1-3 %; float byte planes gain 0.2-0.7 %. Transposing or
grouping by kind helps lzma on the synthetic codes by <= 0.3 % but costs zstd up to 6 % on real
GPTQ codes; the kept layout is the smallest file on the real run (zstd) and within 0.3 % of the
best per codec on the synthetic ones. Whole files of the tiny run (header included): lzma
459,442, zstd 458,236 bytes.

Chunked lzma (compress.lzma_chunk_bytes > 0, codec id 4): the body is cut into pieces of that
many bytes, each compressed alone on compress.threads workers; the file is a pure function of the
body and the chunk size, never of the thread count. On the record-scale synthetic body (27.5 MB,
bench/bench_codecs.py) independent 256 KiB streams are also *smaller* than one lzma-9 stream
(see README "Codec threads"). Chunked zstd (compress.zstd_chunk_bytes > 0, codec id 5) is the same
table of independent frames; zstd's multithreaded mode (one frame) was measured and not adopted.

Code bytes: `CODE_FILES` is the source a user ships to rebuild the model from the artifact and
score it (`python -m stages.evaluate`); tests check that it covers every pgolf module that stage
imports.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pgolf.shared import tensorfile
from pgolf.quantize import lqer
from pgolf.compress import grouping
from pgolf.config import CompressConfig, ConfigError
from pgolf.shared.rowquant import dequantize
from pgolf.shared.tensorfile import TensorFileError

MAGIC = b"PGOLFZ"
FORMAT_VERSION = 1
KIND = "artifact"
MODEL_FILE = "model.ptz"  # the artifact's name in artifacts/final (pgolf.shared.layout.FINAL)
CODEC_IDS = {"lzma": 1, "zstd": 2, "brotli": 3}
LZMA_CHUNKED_ID = 4  # the header's codec id of chunked lzma (its codec name stays "lzma")
ZSTD_CHUNKED_ID = 5  # the header's codec id of chunked zstd (its codec name stays "zstd")
CHUNKED_IDS = {LZMA_CHUNKED_ID: "lzma", ZSTD_CHUNKED_ID: "zstd"}
CODEC_NAMES = {**{v: k for k, v in CODEC_IDS.items()}, **CHUNKED_IDS}
HEADER_BYTES = len(MAGIC) + 6
MAX_RAW_BYTES = 1 << 28  # 256 MiB: decompressed-body bound (a record artifact body is ~27 MB)
PLANES = ".planes."  # stored-name prefix of a float byte-plane group

CODE_FILES: tuple[str, ...] = (
    "stages/__init__.py",
    "stages/evaluate.py",
    "pgolf/__init__.py",
    "pgolf/compress/__init__.py",
    "pgolf/compress/artifact.py",
    "pgolf/compress/grouping.py",
    "pgolf/config.py",
    "pgolf/evaluate/__init__.py",
    "pgolf/evaluate/evaluate.py",
    "pgolf/evaluate/ttt.py",
    "pgolf/quantize/__init__.py",
    "pgolf/quantize/lqer.py",
    "pgolf/shared/__init__.py",
    "pgolf/shared/bpb.py",
    "pgolf/shared/byte_tables.py",
    "pgolf/shared/checked.py",
    "pgolf/shared/dist.py",
    "pgolf/shared/io.py",
    "pgolf/shared/layout.py",
    "pgolf/shared/model.py",
    "pgolf/shared/progress.py",
    "pgolf/shared/rowquant.py",
    "pgolf/shared/shards.py",
    "pgolf/shared/tensorfile.py",
    "pgolf/shared/tokenizer_meta.py",
    "pgolf/shared/train_files.py",
)


class ArtifactError(TensorFileError):
    """An artifact that is truncated, tampered with, of another format version, or not ours."""


# ----------------------------------------------------------------------------- packing layout


def _zigzag(q: torch.Tensor) -> torch.Tensor:
    """int8 -> uint8 bijection 0,-1,1,-2,... -> 0,1,2,3,..."""
    q16 = q.to(torch.int16)
    return ((q16 << 1) ^ (q16 >> 15)).to(torch.uint8)


def _unzigzag(u: torch.Tensor) -> torch.Tensor:
    u16 = u.to(torch.int16)
    return ((u16 >> 1) ^ -(u16 & 1)).to(torch.int8)


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """Little-endian bytes of a float tensor, (numel, itemsize) uint8."""
    t = t.detach().cpu().contiguous().reshape(-1)
    raw = tensorfile._to_bytes(t)
    return np.frombuffer(raw, dtype=np.uint8).reshape(t.numel(), t.element_size())


def _encode(tensors: dict[str, torch.Tensor], grouped: bool = False) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Original tensors -> (stored tensors in layout order, layout table in original order);
    grouped: the 2-D codes go through pgolf.compress.grouping (their permutations are stored last)."""
    layout, codes, others = [], {}, {}
    groups: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    for name in sorted(tensors, key=lambda n: 0 if tensors[n].dtype == torch.int8 else 1):  # stable: file order
        t = tensors[name].detach().cpu()
        dname = tensorfile._NAME_OF.get(t.dtype)
        if dname is None:
            raise TypeError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        entry = {"name": name, "dtype": dname, "shape": list(t.shape)}
        if t.dtype == torch.int8:
            entry["enc"] = "zigzag"
            codes[name] = _zigzag(t.contiguous())
        elif t.is_floating_point():
            entry["enc"], entry["offset"] = "planes", sizes.get(dname, 0)
            groups.setdefault(dname, []).append(_as_bytes(t))
            sizes[dname] = entry["offset"] + t.numel()
        else:
            entry["enc"] = "raw"
            others[name] = t.contiguous()
        layout.append(entry)
    stored, perms = dict(codes), {}
    if grouped:
        blocks, entries = grouping.group(codes)
        for e in layout:
            e.update(entries.get(e["name"], {}))
        perms = {k: v for k, v in blocks.items() if k.startswith(grouping.PERM)}
        stored = {**{k: v for k, v in blocks.items() if k not in perms},
                  **{n: c for n, c in codes.items() if n not in entries}}
    for dname, chunks in groups.items():
        stored[PLANES + dname] = torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks).T))  # (itemsize, n)
    stored.update(others)
    stored.update(perms)
    order = {n: i for i, n in enumerate(tensors)}
    layout.sort(key=lambda e: order[e["name"]])
    return stored, layout


def _decode(stored: dict[str, torch.Tensor], layout: list[dict], source: str) -> dict[str, torch.Tensor]:
    out = {}
    planes = {k[len(PLANES):]: v.numpy().T for k, v in stored.items() if k.startswith(PLANES)}  # (n, itemsize)
    try:
        for e in layout:
            name, shape = e["name"], e["shape"]
            if e["enc"] == "zigzag":
                out[name] = _unzigzag(stored[name])
            elif e["enc"] == "group":
                out[name] = _unzigzag(grouping.ungroup(stored, e, shape))
            elif e["enc"] == "planes":
                n = int(np.prod(shape, dtype=np.int64))
                out[name] = tensorfile.from_buffer(np.ascontiguousarray(planes[e["dtype"]][e["offset"]:e["offset"] + n]),
                                                   e["dtype"], shape)
            elif e["enc"] == "raw":
                out[name] = stored[name]
            else:
                raise ArtifactError(f"{source}: tensor {name!r} has unknown encoding {e['enc']!r}")
            if list(out[name].shape) != list(shape) or tensorfile._NAME_OF[out[name].dtype] != e["dtype"]:
                raise ArtifactError(f"{source}: tensor {name!r} does not decode to {e['dtype']} {shape}")
    except (KeyError, ValueError, TypeError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"{source}: inconsistent layout table ({type(err).__name__}: {err})") from None
    return out


def serialize(tensors: dict[str, torch.Tensor], meta: dict, layout: str = "flat") -> bytes:
    """The raw (uncompressed) artifact body: a tensorfile of kind "artifact" in the packing layout
    (`layout` = compress.layout: "flat", or "grouped" by pgolf.compress.grouping).

    `meta` is the quantized file's meta (model, train_seq_len, tokenizer, quant); it is stored
    whole, plus the artifact version and the layout table.
    """
    stored, layout = _encode(tensors, grouped=layout == "grouped")
    full = {**meta, "artifact_version": FORMAT_VERSION, "layout": layout}
    return tensorfile.dumps(stored, kind=KIND, meta=full)


def deserialize(raw: bytes, source: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `serialize`: (original tensors, meta without the layout table)."""
    try:
        stored, header = tensorfile.loads(raw, source, kind=KIND)
    except TensorFileError as e:
        raise ArtifactError(str(e)) from None
    meta = dict(header["meta"])
    if meta.get("artifact_version") != FORMAT_VERSION:
        raise ArtifactError(f"{source}: artifact version {meta.get('artifact_version')} unsupported "
                            f"(this code reads {FORMAT_VERSION})")
    layout = meta.pop("layout", None)
    if not isinstance(layout, list):
        raise ArtifactError(f"{source}: no layout table in the artifact header")
    return _decode(stored, layout, source), meta


# ----------------------------------------------------------------------------- codecs


def workers(cfg: CompressConfig) -> int:
    """compress.threads, 0 meaning every core this process may run on."""
    if cfg.threads:
        return cfg.threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def codecs(cfg: CompressConfig) -> tuple[str, ...]:
    """The codecs a run computes (and "auto" chooses among): lzma and zstd, plus brotli when
    compress.brotli is on or compress.codec forces it."""
    return ("lzma", "zstd") + (("brotli",) if cfg.brotli or cfg.codec == "brotli" else ())


def _brotli(missing: Exception):
    """The brotli module, imported only when a run or an artifact uses it (the evaluation image may
    lack it); `missing` is raised otherwise."""
    try:
        import brotli
    except ImportError:
        raise missing from None
    return brotli


def _brotli_compress(raw: bytes, cfg: CompressConfig) -> bytes:
    missing = ConfigError("params.yaml: compress.brotli / compress.codec brotli need the Python module 'brotli' "
                          "(pip install brotli)")
    return _brotli(missing).compress(raw, quality=cfg.brotli_quality, lgwin=cfg.brotli_window)


def _lzma_filters(cfg: CompressConfig) -> list[dict]:
    return [{"id": lzma.FILTER_LZMA2, "preset": cfg.lzma_preset | (lzma.PRESET_EXTREME if cfg.lzma_extreme else 0)}]


def _chunked(raw: bytes, step: int, coder, cfg: CompressConfig) -> bytes:
    """uint32 k + k uint32 lengths + the k streams `coder(piece)` of the `step`-byte pieces of
    `raw`, coded on `workers(cfg)` threads (lzma and zstd release the GIL); the bytes are a
    function of `raw` and `step` only, never of the thread count."""
    pieces = [raw[i:i + step] for i in range(0, len(raw), step)] or [b""]
    with ThreadPoolExecutor(max_workers=min(workers(cfg), len(pieces))) as pool:
        streams = list(pool.map(coder, pieces))
    table = struct.pack(f"<{len(streams) + 1}I", len(streams), *(len(x) for x in streams))
    return table + b"".join(streams)


def _lzma_chunked(raw: bytes, cfg: CompressConfig) -> bytes:
    """Raw LZMA2 streams of the compress.lzma_chunk_bytes pieces (`_chunked`). The dictionary is
    the chunk size (a bigger one cannot be used within a chunk; on the record-size body the bytes
    were the same as with preset 9's 64 MiB, at 2.2 times less CPU, the encoder no longer
    initialising a 64 MiB match finder per chunk)."""
    filters = [{**_lzma_filters(cfg)[0], "dict_size": max(cfg.lzma_chunk_bytes, 4096)}]
    return _chunked(raw, cfg.lzma_chunk_bytes,
                    lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=filters), cfg)


def _zstd_frame(raw: bytes, cfg: CompressConfig) -> bytes:
    import zstandard

    # a compressor per call: one object must not run two compressions at once
    return zstandard.ZstdCompressor(level=cfg.zstd_level, write_content_size=True, write_checksum=False).compress(raw)


def _zstd_chunked(raw: bytes, cfg: CompressConfig) -> bytes:
    """Independent zstd frames of the compress.zstd_chunk_bytes pieces (`_chunked`); on the
    record-size synthetic body 128 KiB frames were 6 % smaller than one frame, at 12x less CPU."""
    return _chunked(raw, cfg.zstd_chunk_bytes, lambda b: _zstd_frame(b, cfg), cfg)


def _unchunk(body: bytes, limit: int, codec: str, inflate_one) -> bytes:
    """Inverse of `_chunked`, bounded like `_inflate` (ArtifactError past `limit` bytes or on a bad
    table); `inflate_one(stream, limit_left, limit)` inflates one stream."""
    if len(body) < 4:
        raise ArtifactError(f"chunked {codec} body too short for its table")
    (k,) = struct.unpack("<I", body[:4])
    if k == 0 or len(body) < 4 + 4 * k:
        raise ArtifactError(f"chunked {codec} body: bad table ({k} streams in {len(body)} bytes)")
    lens = struct.unpack(f"<{k}I", body[4:4 + 4 * k])
    if 4 + 4 * k + sum(lens) != len(body):
        raise ArtifactError(f"chunked {codec} body: the stream lengths ({sum(lens):,}) do not add up to the body")
    out, pos, done = [], 4 + 4 * k, 0
    for n in lens:
        out.append(inflate_one(body[pos:pos + n], limit - done, limit))
        pos, done = pos + n, done + len(out[-1])
    return b"".join(out)


def _inflate_lzma(body: bytes, limit: int, bound: int | None = None) -> bytes:
    """One raw LZMA2 stream, at most `limit` bytes (`bound`: the whole body's limit, for the message)."""
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])
    raw = d.decompress(body, max_length=limit + 1)
    if len(raw) > limit:
        raise _too_big("lzma", bound or limit)
    if not d.eof or d.unused_data:
        raise ArtifactError("lzma body is truncated or corrupt (stream incomplete or followed by extra bytes)")
    return raw


def _head_len(raw: bytes) -> int:
    """Length of the tensorfile magic + header at the start of `raw` (0 if it is not one)."""
    if raw[:len(tensorfile.MAGIC)] != tensorfile.MAGIC or len(raw) < 12:
        return 0
    return min(len(raw), 12 + struct.unpack("<I", raw[8:12])[0])


def move_head_last(raw: bytes) -> bytes:
    """The tensorfile `raw` with its magic + header moved to the end, then the header's length
    (4 bytes): what the codecs compress, so the tensors' bytes start the stream."""
    n = _head_len(raw)
    return raw[n:] + raw[:n] + struct.pack("<I", n)


def move_head_first(plain: bytes, source: str) -> bytes:
    """The inverse of `move_head_last`; a body it cannot be names `source`."""
    if len(plain) < 4:
        raise ArtifactError(f"{source}: decompressed body too short ({len(plain)} bytes)")
    (n,) = struct.unpack("<I", plain[-4:])
    if n > len(plain) - 4:
        raise ArtifactError(f"{source}: corrupt body (header length {n} > body {len(plain) - 4})")
    body = plain[:-4]
    return body[len(body) - n:] + body[:len(body) - n]


def compress(raw: bytes, codec: str, cfg: CompressConfig) -> bytes:
    """Header (magic, version, codec) + the compressed body. lzma: a raw LZMA2 stream (no xz
    container: the inner sha256 already guards integrity); zstd: one frame with its size;
    brotli: one stream at compress.brotli_quality, window 2**compress.brotli_window; lzma with
    compress.lzma_chunk_bytes > 0: independent streams (`_lzma_chunked`, codec id 4); zstd with
    compress.zstd_chunk_bytes > 0: independent frames (`_zstd_chunked`, codec id 5)."""
    if codec not in CODEC_IDS:
        raise ValueError(f"codec must be one of {', '.join(CODEC_IDS)}; got {codec!r}")
    crc = struct.pack("<I", zlib.crc32(raw))
    raw = move_head_last(raw)
    cid = CODEC_IDS[codec]
    if codec == "lzma" and cfg.lzma_chunk_bytes:
        body, cid = _lzma_chunked(raw, cfg), LZMA_CHUNKED_ID
    elif codec == "lzma":
        body = lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_lzma_filters(cfg))
    elif codec == "brotli":
        body = _brotli_compress(raw, cfg)
    elif cfg.zstd_chunk_bytes:
        body, cid = _zstd_chunked(raw, cfg), ZSTD_CHUNKED_ID
    else:
        body = _zstd_frame(raw, cfg)
    return MAGIC + bytes([FORMAT_VERSION, cid]) + crc + body


def _inflate(codec: str, body: bytes, limit: int, chunked: bool = False) -> bytes:
    """The decompressed body, read in bounded steps: ArtifactError once it would pass `limit`
    bytes (a small crafted file must not expand without bound), or when the stream is incomplete."""
    inflate_one = _INFLATE[codec]
    return _unchunk(body, limit, codec, inflate_one) if chunked else inflate_one(body, limit)


def _too_big(codec: str, limit: int) -> ArtifactError:
    return ArtifactError(f"{codec} body expands to more than {limit:,} bytes (the limit for an artifact body)")


def _inflate_zstd(body: bytes, limit: int, bound: int | None = None) -> bytes:
    """One zstd frame, at most `limit` bytes (`bound`: the whole body's limit, for the message)."""
    import zstandard

    size = zstandard.frame_content_size(body)  # compress() always records it in the frame header
    if size < 0:
        raise ArtifactError("zstd body does not record its decompressed size")
    if size > limit:
        raise _too_big("zstd", bound or limit)
    return zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)


def _inflate_brotli(body: bytes, limit: int, bound: int | None = None) -> bytes:
    """One brotli stream, at most `limit` bytes (`bound`: the whole body's limit, for the message)."""
    d = _brotli(ArtifactError("compressed with brotli, but the Python module 'brotli' is not installed "
                              "(pip install brotli)")).Decompressor()
    raw = d.process(body, output_buffer_limit=limit + 1)
    if len(raw) > limit:
        raise _too_big("brotli", bound or limit)
    if not d.is_finished():
        raise ArtifactError("brotli body is truncated or corrupt (stream incomplete)")
    return raw


_INFLATE = {"lzma": _inflate_lzma, "zstd": _inflate_zstd, "brotli": _inflate_brotli}  # one stream of each codec


def decompress(blob: bytes, source: str = "<bytes>") -> tuple[str, bytes]:
    """(codec, raw body) of a compressed artifact; ArtifactError naming `source` otherwise."""
    if len(blob) < HEADER_BYTES or blob[:len(MAGIC)] != MAGIC:
        raise ArtifactError(f"{source}: not a pgolf artifact (bad magic; {len(blob)} bytes)")
    version, cid = blob[len(MAGIC)], blob[len(MAGIC) + 1]
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{source}: artifact format version {version} unsupported (this code reads {FORMAT_VERSION})")
    if cid not in CODEC_NAMES:
        raise ArtifactError(f"{source}: unknown codec id {cid}")
    codec, body = CODEC_NAMES[cid], blob[HEADER_BYTES:]
    (crc,) = struct.unpack("<I", blob[len(MAGIC) + 2:HEADER_BYTES])
    try:
        raw = _inflate(codec, body, MAX_RAW_BYTES, chunked=cid in CHUNKED_IDS)
    except ArtifactError as e:
        raise ArtifactError(f"{source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - lzma / zstd / brotli errors, EOF: all mean corrupt
        raise ArtifactError(f"{source}: {codec} body is truncated or corrupt ({type(e).__name__}: {e})") from None
    raw = move_head_first(raw, source)
    if zlib.crc32(raw) != crc:
        raise ArtifactError(f"{source}: checksum mismatch (CRC-32 of the decompressed body; header or payload "
                            f"modified or corrupt)")
    return codec, raw


def compress_all(raw: bytes, cfg: CompressConfig) -> dict[str, bytes]:
    """Every codec's file bytes (`codecs(cfg)`), computed concurrently: the coders release the GIL,
    so on a record-size body (~27 MB, ~40 s each on one core) this divides the wall time of a probe."""
    names = codecs(cfg)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = {c: pool.submit(compress, raw, c, cfg) for c in names}
        return {c: f.result() for c, f in futures.items()}


def sizes(raw: bytes, cfg: CompressConfig) -> dict[str, int]:
    """Compressed file size per codec of `codecs(cfg)`: {"lzma": n, "zstd": n, ...} (header included)."""
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
    return cfg.codec, compress(raw, cfg.codec, cfg)


# ----------------------------------------------------------------------------- reading


def loads_artifact(blob: bytes, source: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict]:
    _, raw = decompress(blob, source)
    return deserialize(raw, source)


def read_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Decompress + parse an artifact file: (tensors, meta). Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact not found (run the compress stage first)")
    return loads_artifact(path.read_bytes(), str(path))


def dequantize_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Float (fp32) state dict for `GPT.load_export_state_dict`, following meta["quant"]."""
    quant = meta.get("quant")
    if not isinstance(quant, dict):
        raise ArtifactError("artifact meta has no 'quant' table")
    out, used = {}, set()
    for name, info in quant.items():
        kind = info.get("type") if isinstance(info, dict) else info
        if kind in ("int6", "int8"):
            q, s = tensors.get(f"{name}.q"), tensors.get(f"{name}.scale")
            if q is None or s is None:
                raise ArtifactError(f"artifact: {kind} tensor {name!r} lacks its .q or .scale")
            if q.dim() != 2 or s.shape != (q.shape[0],):
                raise ArtifactError(f"artifact: {name!r} codes {tuple(q.shape)} / scale {tuple(s.shape)} mismatch")
            out[name] = dequantize(q, s)
            used.update((f"{name}.q", f"{name}.scale"))
            if isinstance(info, dict) and "lqer" in info:
                out[name] = out[name] + _lqer_correction(tensors, name, tuple(q.shape), info["lqer"])
                used.update(name + x for x in lqer.SUFFIXES)
        elif kind in ("passthrough", "passthrough_ctrl"):
            if name not in tensors:
                raise ArtifactError(f"artifact: passthrough tensor {name!r} missing")
            out[name] = tensors[name].float()
            used.add(name)
        else:
            raise ArtifactError(f"artifact: tensor {name!r} has unknown quant type {kind!r}")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ArtifactError(f"artifact: tensors without a quant entry: {extra[:5]}")
    return out


def _lqer_correction(tensors: dict[str, torch.Tensor], name: str, shape: tuple, info) -> torch.Tensor:
    """The LQER term of `name` (pgolf.quantize.lqer) named by its quant entry's {"rank", "bits"}."""
    rank = info.get("rank") if isinstance(info, dict) else None
    if not isinstance(rank, int) or rank < 1:
        raise ArtifactError(f"artifact: tensor {name!r} has a bad LQER entry {info!r}")
    try:
        return lqer.correction(tensors, name, shape, rank)
    except lqer.LQERError as e:
        raise ArtifactError(f"artifact: {e}") from None


# ----------------------------------------------------------------------------- code bytes


def code_files(root: str | Path = ".") -> list[dict]:
    """[{"path", "bytes"}] for every file of CODE_FILES (FileNotFoundError if one is missing)."""
    root = Path(root)
    out = []
    for rel in CODE_FILES:
        p = root / rel
        if not p.is_file():
            raise FileNotFoundError(f"{p}: counted code file missing")
        out.append({"path": rel, "bytes": p.stat().st_size})
    return out


def code_bytes(root: str | Path = ".") -> int:
    return sum(e["bytes"] for e in code_files(root))
