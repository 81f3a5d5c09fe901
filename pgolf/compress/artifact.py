"""The submission artifact `artifacts/final/model.ptz`: its file format, writing and reading.

A file is

    6 bytes  magic b"PGOLFZ"
    1 byte   FORMAT_VERSION
    1 byte   codec id (1 = lzma raw LZMA2 stream, 2 = zstd frame, 3 = brotli stream,
             4 = lzma in independent raw LZMA2 streams, 5 = zstd in independent frames; the
             chunked forms start with their stream table: pgolf.compress.codecs; 6 = per-group
             pieces, each by its own codec: pgolf.compress.pergroup)
    4 bytes  uint32 CRC-32 of the uncompressed tensorfile (its JSON header is covered too;
             the container's own sha256 covers only the payload)
    rest     the compressed body

The body decompresses to `payload + head + uint32 len(head)` where `head + payload` is a
`pgolf.shared.tensorfile` container of kind "artifact" (the JSON header behind the arrays, so
that zstd gathers its statistics on the arrays): JSON header with the model config, tokenizer,
quant table, a layout table and the payload sha256, then raw little-endian arrays; loading never
unpickles, and inflation is bounded by MAX_RAW_BYTES.

Packing layout (`serialize`):
  * every int8 tensor (int6/int8 codes) is zigzag-mapped to uint8 (0, -1, 1, -2, ... -> 0, 1, 2,
    3, ...), in its original shape; all codes come first, in the quantized file's tensor order
    (`compress.layout: grouped` stores them by role instead: pgolf.compress.grouping; `pergroup`
    too, its permutations as uint16 where they fit, then compresses each group on its own);
  * all float tensors of one dtype (row scales, passthrough fp16/fp32) are concatenated and split
    into byte planes (all low bytes, then all high bytes), after the codes;
  * anything else (bool, wider ints) is stored as is, last.
Chosen against the alternatives by measurement (docs/formats.md; tests/test_artifact.py keeps the check).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from pgolf.compress import codecs
from pgolf.config import CompressConfig
from pgolf.shared import tensorfile
from pgolf.shared.tensorfile import TensorFileError

MAGIC = b"PGOLFZ"
FORMAT_VERSION = 1
KIND = "artifact"
MODEL_FILE = "model.ptz"  # the artifact's name in artifacts/final (pgolf.shared.layout.FINAL)
CODEC_IDS = {"lzma": 1, "zstd": 2, "brotli": 3, "pergroup": 6}  # pergroup: compress.layout pergroup
LZMA_CHUNKED_ID = 4  # the header's codec id of chunked lzma (its codec name stays "lzma")
ZSTD_CHUNKED_ID = 5  # the header's codec id of chunked zstd (its codec name stays "zstd")
CHUNKED_IDS = {LZMA_CHUNKED_ID: "lzma", ZSTD_CHUNKED_ID: "zstd"}
CHUNKED_ID_OF = {name: cid for cid, name in CHUNKED_IDS.items()}
CODEC_NAMES = {**{v: k for k, v in CODEC_IDS.items()}, **CHUNKED_IDS}
HEADER_BYTES = len(MAGIC) + 6
MAX_RAW_BYTES = 1 << 28  # 256 MiB: decompressed-body bound (a record artifact body is ~27 MB)
PLANES = ".planes."  # stored-name prefix of a float byte-plane group
FLAT = CompressConfig()  # the default packing: compress.layout flat


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


def _encode(tensors: dict[str, torch.Tensor], cfg: CompressConfig) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Original tensors -> (stored tensors in layout order, layout table in original order); with
    compress.layout grouped or pergroup the 2-D codes go through pgolf.compress.grouping (their
    permutations are stored last)."""
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
    if cfg.layout in ("grouped", "pergroup"):
        from pgolf.compress import grouping  # compress.layout grouped / pergroup only

        blocks, entries = grouping.group(codes, cfg)
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
            elif e["enc"] == "group":  # a compress.layout grouped artifact
                from pgolf.compress import grouping

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


def serialize(tensors: dict[str, torch.Tensor], meta: dict, cfg: CompressConfig = FLAT) -> bytes:
    """The raw (uncompressed) artifact body: a tensorfile of kind "artifact" in the packing `cfg`
    gives: compress.layout "flat", or "grouped" / "pergroup" by pgolf.compress.grouping (with its
    row_order and transpose_groups).

    `meta` is the quantized file's meta (model, train_seq_len, tokenizer, quant); it is stored
    whole, plus the artifact version and the layout table.
    """
    stored, layout = _encode(tensors, cfg)
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


# ----------------------------------------------------------------------------- the file


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


def compress(raw: bytes, codec: str, cfg: CompressConfig, like: bytes | None = None) -> bytes:
    """The artifact file of the body `raw`: header (magic, version, codec id, CRC-32 of `raw`) +
    `raw` with its head moved last, compressed by `codec` (pgolf.compress.codecs.encode). `like`: an
    earlier per-group artifact file of the same layout, whose per-piece codecs a per-group body reuses."""
    if codec not in CODEC_IDS:
        raise ValueError(f"codec must be one of {', '.join(CODEC_IDS)}; got {codec!r}")
    crc = struct.pack("<I", zlib.crc32(raw))
    if codec == "pergroup":
        from pgolf.compress import pergroup

        earlier = like[HEADER_BYTES:] if like is not None and like[len(MAGIC) + 1] == CODEC_IDS[codec] else None
        return MAGIC + bytes([FORMAT_VERSION, CODEC_IDS[codec]]) + crc + pergroup.encode(
            move_head_last(raw), raw, cfg, earlier)
    body, chunked = codecs.encode(move_head_last(raw), codec, cfg)
    cid = CHUNKED_ID_OF[codec] if chunked else CODEC_IDS[codec]
    return MAGIC + bytes([FORMAT_VERSION, cid]) + crc + body


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
        if codec == "pergroup":
            from pgolf.compress import pergroup

            raw = pergroup.inflate(body, MAX_RAW_BYTES)
        else:
            raw = codecs.inflate(codec, body, MAX_RAW_BYTES, chunked=cid in CHUNKED_IDS)
    except codecs.CodecError as e:
        raise ArtifactError(f"{source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - lzma / zstd / brotli errors, EOF: all mean corrupt
        raise ArtifactError(f"{source}: {codec} body is truncated or corrupt ({type(e).__name__}: {e})") from None
    raw = move_head_first(raw, source)
    if zlib.crc32(raw) != crc:
        raise ArtifactError(f"{source}: checksum mismatch (CRC-32 of the decompressed body; header or payload "
                            f"modified or corrupt)")
    return codec, raw


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
