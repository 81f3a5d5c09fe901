"""The codecs of the artifact's body: lzma, zstd and brotli, one stream or chunked, and bounded inflation.

This module owns how a body becomes compressed bytes and back. `encode(raw, codec, cfg)`: lzma is
a raw LZMA2 stream (no xz container: the artifact's checksums guard integrity), zstd one frame
with its size, brotli one stream at compress.brotli_quality, window 2**compress.brotli_window.
With compress.lzma_chunk_bytes (compress.zstd_chunk_bytes) > 0 the body is cut into pieces of
that many bytes, each compressed alone on compress.threads workers, and the result is a table
(uint32 count k, k uint32 stream lengths) followed by the k independent streams; the bytes are a
function of the body and the chunk size only, never of the thread count. `inflate` reads any of
these in bounded steps: CodecError once the output would pass its limit (a small crafted file must
not expand without bound) or when a stream is incomplete. Why these codecs and chunk sizes:
docs/post-training.md, "Codec threads".
"""

from __future__ import annotations

import lzma
import os
import struct
from concurrent.futures import ThreadPoolExecutor

from pgolf.config import CompressConfig, ConfigError


class CodecError(ValueError):
    """A body that does not inflate within its limit, or whose stream or chunk table is broken."""


def workers(cfg: CompressConfig) -> int:
    """compress.threads, 0 meaning every core this process may run on."""
    if cfg.threads:
        return cfg.threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- compress


def encode(raw: bytes, codec: str, cfg: CompressConfig) -> tuple[bytes, bool]:
    """(`raw` compressed by `codec` ("lzma", "zstd" or "brotli"), whether it is chunked)."""
    if codec == "lzma" and cfg.lzma_chunk_bytes:
        return _lzma_chunked(raw, cfg), True
    if codec == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_lzma_filters(cfg)), False
    if codec == "brotli":
        return _brotli_compress(raw, cfg), False
    if cfg.zstd_chunk_bytes:
        return _zstd_chunked(raw, cfg), True
    return _zstd_frame(raw, cfg), False


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
    the chunk size: a bigger one cannot be used within a chunk, and the encoder then does not
    initialise preset 9's 64 MiB match finder per chunk."""
    filters = [{**_lzma_filters(cfg)[0], "dict_size": max(cfg.lzma_chunk_bytes, 4096)}]
    return _chunked(raw, cfg.lzma_chunk_bytes,
                    lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=filters), cfg)


def _zstd_frame(raw: bytes, cfg: CompressConfig) -> bytes:
    import zstandard

    # a compressor per call: one object must not run two compressions at once
    return zstandard.ZstdCompressor(level=cfg.zstd_level, write_content_size=True, write_checksum=False).compress(raw)


def _zstd_chunked(raw: bytes, cfg: CompressConfig) -> bytes:
    """Independent zstd frames of the compress.zstd_chunk_bytes pieces (`_chunked`)."""
    return _chunked(raw, cfg.zstd_chunk_bytes, lambda b: _zstd_frame(b, cfg), cfg)


# ----------------------------------------------------------------------------- inflate


def inflate(codec: str, body: bytes, limit: int, chunked: bool = False) -> bytes:
    """The decompressed body, read in bounded steps: CodecError once it would pass `limit`
    bytes, or when the stream is incomplete. The codecs' own errors on a corrupt stream pass through."""
    inflate_one = _INFLATE[codec]
    return _unchunk(body, limit, codec, inflate_one) if chunked else inflate_one(body, limit)


def _unchunk(body: bytes, limit: int, codec: str, inflate_one) -> bytes:
    """Inverse of `_chunked`, bounded like `inflate` (CodecError past `limit` bytes or on a bad
    table); `inflate_one(stream, limit_left, limit)` inflates one stream."""
    if len(body) < 4:
        raise CodecError(f"chunked {codec} body too short for its table")
    (k,) = struct.unpack("<I", body[:4])
    if k == 0 or len(body) < 4 + 4 * k:
        raise CodecError(f"chunked {codec} body: bad table ({k} streams in {len(body)} bytes)")
    lens = struct.unpack(f"<{k}I", body[4:4 + 4 * k])
    if 4 + 4 * k + sum(lens) != len(body):
        raise CodecError(f"chunked {codec} body: the stream lengths ({sum(lens):,}) do not add up to the body")
    out, pos, done = [], 4 + 4 * k, 0
    for n in lens:
        out.append(inflate_one(body[pos:pos + n], limit - done, limit))
        pos, done = pos + n, done + len(out[-1])
    return b"".join(out)


def _too_big(codec: str, limit: int) -> CodecError:
    return CodecError(f"{codec} body expands to more than {limit:,} bytes (the limit for an artifact body)")


def _inflate_lzma(body: bytes, limit: int, bound: int | None = None) -> bytes:
    """One raw LZMA2 stream, at most `limit` bytes (`bound`: the whole body's limit, for the message)."""
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])
    raw = d.decompress(body, max_length=limit + 1)
    if len(raw) > limit:
        raise _too_big("lzma", bound or limit)
    if not d.eof or d.unused_data:
        raise CodecError("lzma body is truncated or corrupt (stream incomplete or followed by extra bytes)")
    return raw


def _inflate_zstd(body: bytes, limit: int, bound: int | None = None) -> bytes:
    """One zstd frame, at most `limit` bytes (`bound`: the whole body's limit, for the message)."""
    import zstandard

    size = zstandard.frame_content_size(body)  # encode() always records it in the frame header
    if size < 0:
        raise CodecError("zstd body does not record its decompressed size")
    if size > limit:
        raise _too_big("zstd", bound or limit)
    return zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)


def _inflate_brotli(body: bytes, limit: int, bound: int | None = None) -> bytes:
    """One brotli stream, at most `limit` bytes (`bound`: the whole body's limit, for the message)."""
    d = _brotli(CodecError("compressed with brotli, but the Python module 'brotli' is not installed "
                           "(pip install brotli)")).Decompressor()
    raw = d.process(body, output_buffer_limit=limit + 1)
    if len(raw) > limit:
        raise _too_big("brotli", bound or limit)
    if not d.is_finished():
        raise CodecError("brotli body is truncated or corrupt (stream incomplete)")
    return raw


_INFLATE = {"lzma": _inflate_lzma, "zstd": _inflate_zstd, "brotli": _inflate_brotli}  # one stream of each codec
