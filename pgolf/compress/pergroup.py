"""Per-group compression of the artifact body (compress.layout "pergroup", the artifact's codec id 6).

The body is the grouped layout's tensorfile (pgolf.compress.grouping: the int codes of one role in
one block, rows ordered so that similar rows are neighbours, the permutation stored as uint16 when
it fits; float tensors already split into byte planes by pgolf.compress.artifact, i.e. byte-shuffled),
with its head moved last. It is cut at the byte ranges of the `.group.*` and `.planes.*` arrays; every
piece (each group, each plane block, and the runs in between: the remainder) is compressed by each
codec of compress.pergroup_codecs that this machine has, and the smallest stream is kept (ties: the
earlier codec in the table below). A codec whose stream does not decode back to its piece is dropped.
Every (piece, codec) pair runs as its own task, so the largest piece's codecs run side by side.
With lrzip here, the run of code groups is also compressed as one lrzip piece, kept where it is
smaller than its pieces (PR #2135 compresses its code tensors as one lrzip stream). Pruning's probes
pass the unpruned body as `like`: pruning keeps every array's length, so the body is cut as there
and each piece compressed by the codec chosen for it there alone (one task per piece).

Codecs: lzma (raw LZMA2, compress.lzma_preset), zstd (compress.zstd_level), brotli (Python module
`brotli`, optional), ppmd (PPMd var. H of the optional module `pyppmd`, order PPMD_ORDER, PPMD_MEM
bytes of model memory) and lrzip (the system program `lrzip -z -L compress.lrzip_level`, ZPAQ; used
only when shutil.which finds it; a stream is decoded only when its header states the table's raw
length). Loading needs the codecs the file names, nothing else.

Body: uint32 k, then k entries (uint8 codec id, uint32 raw length, uint32 stream length), then the k
streams. `inflate` refuses a table whose raw lengths pass the limit before decoding anything, and
every stream must decode to exactly its recorded length.
"""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pgolf.compress import codecs
from pgolf.compress.codecs import CodecError
from pgolf.compress.grouping import GROUP
from pgolf.config import CompressConfig
from pgolf.shared import tensorfile

IDS = {"lzma": 1, "zstd": 2, "brotli": 3, "ppmd": 4, "lrzip": 5}  # a piece's codec id (table order = tie order)
NAMES = {v: k for k, v in IDS.items()}
CUT_PREFIXES = (GROUP, ".planes.")  # arrays that become pieces of their own
PPMD_ORDER = 6
PPMD_MEM = 1 << 26  # 64 MiB (the decoder allocates the same)
ENTRY = struct.Struct("<BII")
LRZIP_HEAD = struct.Struct("<4sBBq")  # magic, major, minor, decoded size


# ----------------------------------------------------------------------------- the codecs


def _has_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def available(names: tuple[str, ...]) -> list[str]:
    """The codecs of `names` this machine can run (lzma, zstd always; the others when found)."""
    have = {"lzma": True, "zstd": True, "brotli": _has_module("brotli"), "ppmd": _has_module("pyppmd"),
            "lrzip": shutil.which("lrzip") is not None}
    return [c for c in IDS if c in names and have[c]]


def _lzma_filters(cfg: CompressConfig) -> list[dict]:
    return codecs._lzma_filters(cfg)


def _lrzip(data: bytes, args: list[str]) -> bytes:
    """Run `lrzip <args>` from a temporary input file to a temporary output file (CodecError when it fails)."""
    program = shutil.which("lrzip")
    if program is None:
        raise CodecError("a per-group piece is lrzip-compressed, but the program 'lrzip' is not installed")
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.lrz" if "-d" in args else "in"), os.path.join(d, "out")
        with open(src, "wb") as f:
            f.write(data)
        run = subprocess.run([program, *args, "-q", "-f", "-o", dst, src], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        if run.returncode != 0 or not os.path.isfile(dst):
            why = run.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
            raise CodecError(f"lrzip {' '.join(args)} failed: {why[0]}")
        with open(dst, "rb") as f:
            return f.read()


def _lrzip_size(stream: bytes) -> int:
    """The decoded size an lrzip stream's header states (magic LRZI, version 0.6, int64 LE at byte 6)."""
    if len(stream) < LRZIP_HEAD.size or stream[:4] != b"LRZI" or stream[4:6] != b"\x00\x06":
        raise CodecError("per-group lrzip piece has no lrzip 0.6 header")
    return LRZIP_HEAD.unpack_from(stream)[-1]


def _encode_one(data: bytes, codec: str, cfg: CompressConfig) -> bytes:
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_lzma_filters(cfg))
    if codec == "zstd":
        return codecs._zstd_frame(data, cfg)
    if codec == "brotli":
        return codecs._brotli_compress(data, cfg)
    if codec == "ppmd":
        import pyppmd

        enc = pyppmd.Ppmd7Encoder(PPMD_ORDER, PPMD_MEM)
        return enc.encode(data) + enc.flush(endmark=True)  # the decoder stops at the end mark
    if codec == "lrzip":
        return _lrzip(data, ["-z", "-L", str(cfg.lrzip_level)])
    raise ValueError(f"unknown per-group codec {codec!r}")


def _decode_one(stream: bytes, codec: str, n: int) -> bytes:
    """`stream` decoded by `codec` to exactly `n` bytes (CodecError otherwise)."""
    if codec in ("lzma", "zstd", "brotli"):
        out = codecs._INFLATE[codec](stream, n)
    elif codec == "ppmd":
        import pyppmd

        out = pyppmd.Ppmd7Decoder(PPMD_ORDER, PPMD_MEM).decode(stream, n)
    elif codec == "lrzip":
        stated = _lrzip_size(stream)
        if stated != n:  # the program writes what its header states: refused before it runs
            raise CodecError(f"per-group lrzip piece states {stated:,} bytes, its table says {n:,}")
        out = _lrzip(stream, ["-d"])
    else:
        raise CodecError(f"unknown per-group codec {codec!r}")
    if len(out) != n:
        raise CodecError(f"per-group {codec} piece decodes to {len(out):,} bytes, its table says {n:,}")
    return out


# ----------------------------------------------------------------------------- pieces


def cuts(raw: bytes) -> list[int]:
    """Cut points (positions in `artifact.move_head_last(raw)`) around the arrays of CUT_PREFIXES: the
    payload comes first there, so an array's payload offset is its position."""
    header, start = tensorfile._parse_header(raw, "<body>")
    n = len(raw) + 4
    points = {0, n}
    for e in header["tensors"]:
        if e["name"].startswith(CUT_PREFIXES):
            points.update((e["offset"], e["offset"] + e["nbytes"]))
    return sorted(points)


def split(body: bytes, raw: bytes) -> list[bytes]:
    """The pieces of `body` (= move_head_last(raw)), cut at `cuts(raw)`, empty ones left out."""
    points = cuts(raw)
    return [body[a:b] for a, b in zip(points, points[1:]) if b > a]


def _try(piece: bytes, codec: str, cfg: CompressConfig) -> bytes | None:
    """`piece` by `codec`, or None where an optional codec fails here or does not decode back to it."""
    try:
        s = _encode_one(piece, codec, cfg)
        if codec in ("ppmd", "lrzip") and _decode_one(s, codec, len(piece)) != piece:
            return None
    except (OSError, subprocess.SubprocessError, CodecError, ImportError):
        return None  # an optional codec that fails here is left out; lzma and zstd always run
    return s


def _best(streams: list[tuple[str, bytes | None]]) -> tuple[str, bytes] | None:
    """(codec, stream): the smallest of one piece's streams (ties: the earlier codec); None if none."""
    return min(((c, s) for c, s in streams if s is not None), key=lambda cs: len(cs[1]), default=None)


def _smallest(pieces: list[bytes], tries: list[list[str]], cfg: CompressConfig) -> list[tuple[str, bytes] | None]:
    """The smallest stream of each piece among its codecs in `tries`. Every (piece, codec) pair is one
    task of the pool, largest pieces first."""
    tasks = sorted(((i, c) for i, names in enumerate(tries) for c in names), key=lambda t: -len(pieces[t[0]]))
    with ThreadPoolExecutor(max_workers=max(1, min(codecs.workers(cfg), len(tasks)))) as pool:
        futures = {t: pool.submit(_try, pieces[t[0]], t[1], cfg) for t in tasks}
        return [_best([(c, futures[i, c].result()) for c in names]) for i, names in enumerate(tries)]


def _like(like: bytes, body: bytes, raw: bytes, names: list[str]) -> tuple[list[bytes], list[list[str]]] | None:
    """The pieces of `body` cut where `like` (a per-group body) cut its own, each with the codec chosen
    there to try (every codec of `names` where that one is not here); None where its cuts are not
    cut points of `raw` (another layout)."""
    _, entries = _table(like)
    ends = np.cumsum([n for _, n, _ in entries]).tolist()
    if not ends or ends[-1] != len(body) or not set(ends) <= set(cuts(raw)):
        return None
    pieces = [body[a:b] for a, b in zip([0, *ends], ends)]
    return pieces, [[NAMES[c]] if NAMES[c] in names else names for c, _, _ in entries]


def _join_groups(body: bytes, raw: bytes, pieces: list[bytes], chosen: list[tuple[str, bytes]],
                 cfg: CompressConfig) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    """The code groups (every `.group.*` array and what lies between them) as one lrzip piece instead,
    where that stream and its table entry are smaller than theirs piece by piece (PR #2135 compresses
    its code tensors as one lrzip stream)."""
    header, _ = tensorfile._parse_header(raw, "<body>")
    spans = [(e["offset"], e["offset"] + e["nbytes"]) for e in header["tensors"] if e["name"].startswith(GROUP)]
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    if len(spans) < 2:
        return pieces, chosen
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    i = ends.index(lo) + 1 if lo else 0  # the piece that starts at lo ...
    j = ends.index(hi)  # ... to the one that ends at hi
    stream = _try(body[lo:hi], "lrzip", cfg)
    if stream is None or len(stream) >= sum(len(s) for _, s in chosen[i:j + 1]) + ENTRY.size * (j - i):
        return pieces, chosen
    return [*pieces[:i], body[lo:hi], *pieces[j + 1:]], [*chosen[:i], ("lrzip", stream), *chosen[j + 1:]]


def encode(body: bytes, raw: bytes, cfg: CompressConfig, like: bytes | None = None) -> bytes:
    """The per-group body of `body` (= move_head_last(raw)): table + the smallest stream per piece;
    with lrzip here, the code groups as one lrzip piece where that is smaller (`_join_groups`).
    `like`: an earlier per-group body of the same layout (pruning's probes, pgolf.compress.compress):
    the pieces are cut as there, each tries only the codec chosen for it there, and the other codecs
    where that one fails."""
    names = available(tuple(cfg.pergroup_codecs))
    reused = None if like is None else _like(like, body, raw, names)
    if reused is None:
        pieces = split(body, raw)
        tries = [names] * len(pieces)
    else:
        pieces, tries = reused
    chosen = _smallest(pieces, tries, cfg)
    failed = [i for i, ch in enumerate(chosen) if ch is None]
    if failed:  # the reused codec failed on its new piece: the other codecs, not that one again
        rest = [[c for c in names if c not in tries[i]] for i in failed]
        for i, ch in zip(failed, _smallest([pieces[i] for i in failed], rest, cfg)):
            if ch is None:
                raise CodecError(f"per-group piece {i} ({len(pieces[i])} bytes): no codec of {names} encoded it")
            chosen[i] = ch
    if reused is None and "lrzip" in names:
        pieces, chosen = _join_groups(body, raw, pieces, chosen, cfg)
    table = struct.pack("<I", len(pieces)) + b"".join(
        ENTRY.pack(IDS[c], len(p), len(s)) for p, (c, s) in zip(pieces, chosen))
    return table + b"".join(s for _, s in chosen)


def describe(body: bytes) -> list[dict]:
    """The table of a per-group body: [{"codec", "raw_bytes", "bytes"}] (for benches and logs)."""
    k, entries = _table(body)
    return [{"codec": NAMES[c], "raw_bytes": n, "bytes": m} for c, n, m in entries]


def _table(body: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    if len(body) < 4:
        raise CodecError("per-group body too short for its table")
    (k,) = struct.unpack("<I", body[:4])
    if k == 0 or len(body) < 4 + ENTRY.size * k:
        raise CodecError(f"per-group body: bad table ({k} pieces in {len(body)} bytes)")
    entries = [ENTRY.unpack_from(body, 4 + ENTRY.size * i) for i in range(k)]
    if any(c not in NAMES for c, _, _ in entries):
        raise CodecError("per-group body: unknown codec id in its table")
    if 4 + ENTRY.size * k + sum(m for _, _, m in entries) != len(body):
        raise CodecError("per-group body: the stream lengths do not add up to the body")
    return k, entries


def inflate(body: bytes, limit: int) -> bytes:
    """Inverse of `encode`, bounded: CodecError when the table's raw lengths pass `limit` (checked
    before any decoding) or a stream does not decode to its recorded length."""
    k, entries = _table(body)
    total = sum(n for _, n, _ in entries)
    if total > limit:
        raise CodecError(f"per-group body expands to {total:,} bytes, more than {limit:,} (the limit for an artifact body)")
    out, pos = [], 4 + ENTRY.size * k
    for c, n, m in entries:
        out.append(_decode_one(body[pos:pos + m], NAMES[c], n))
        pos += m
    return b"".join(out)
