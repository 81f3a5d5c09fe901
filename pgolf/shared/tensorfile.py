"""A safe tensor container: JSON header + raw little-endian arrays, never a pickle.

Layout of a file (all integers little-endian):

    8 bytes   magic b"PGOLFTF\\x00"
    4 bytes   uint32 header length H
    H bytes   UTF-8 JSON header: {"format": "pgolf-tensors", "version": 1, "kind": str,
              "meta": {...}, "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}],
              "payload_bytes": int, "payload_sha256": hex}
    payload   the arrays, in table order, offsets relative to the payload start

Used for every tensor output of the pipeline (float weights, Hessians, quantized codes) and as
the inner layer of the submission artifact. Loading only parses JSON and copies bytes, so a
file can never execute code; truncated, tampered or foreign files raise `TensorFileError`
naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from pgolf.shared.io import atomic_write_bytes

MAGIC = b"PGOLFTF\x00"
VERSION = 1

_DTYPES = {  # name -> (torch dtype, numpy storage dtype)
    "float32": (torch.float32, "<f4"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<u2"),  # stored as raw bits
    "float64": (torch.float64, "<f8"),
    "int8": (torch.int8, "i1"),
    "uint8": (torch.uint8, "u1"),
    "int16": (torch.int16, "<i2"),
    "int32": (torch.int32, "<i4"),
    "int64": (torch.int64, "<i8"),
    "bool": (torch.bool, "?"),
}
_NAME_OF = {t: n for n, (t, _) in _DTYPES.items()}


class TensorFileError(ValueError):
    """A tensor file that is truncated, tampered with, or not ours."""


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()


def from_buffer(buf, dtype: str, shape: list[int], offset: int = 0) -> torch.Tensor:
    """A tensor (own copy) of `dtype` (a name of the table above) and `shape`, read from `buf`."""
    tdtype, npdtype = _DTYPES[dtype]
    arr = np.frombuffer(buf, dtype=npdtype, count=int(np.prod(shape, dtype=np.int64)), offset=offset).reshape(shape)
    t = torch.from_numpy(arr.copy())
    return t.view(torch.bfloat16) if tdtype == torch.bfloat16 else t


def dumps(tensors: dict[str, torch.Tensor], kind: str, meta: dict | None = None) -> bytes:
    """Serialise named tensors (any order kept) into the container format."""
    table, chunks, offset = [], [], 0
    for name, t in tensors.items():
        if t.dtype not in _NAME_OF:
            raise TypeError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        raw = _to_bytes(t)
        table.append({"name": name, "dtype": _NAME_OF[t.dtype], "shape": list(t.shape),
                      "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    payload = b"".join(chunks)
    header = {"format": "pgolf-tensors", "version": VERSION, "kind": kind, "meta": meta or {},
              "tensors": table, "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(hbytes)) + hbytes + payload


def _parse_header(blob: bytes, source: str) -> tuple[dict, int]:
    if len(blob) < 12 or blob[:8] != MAGIC:
        raise TensorFileError(f"{source}: not a pgolf tensor file (bad magic)")
    (hlen,) = struct.unpack("<I", blob[8:12])
    if 12 + hlen > len(blob):
        raise TensorFileError(f"{source}: truncated header ({len(blob)} bytes, header needs {12 + hlen})")
    try:
        header = json.loads(blob[12:12 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"{source}: corrupt header: {e}") from None
    if header.get("format") != "pgolf-tensors":
        raise TensorFileError(f"{source}: foreign header format {header.get('format')!r}")
    if header.get("version") != VERSION:
        raise TensorFileError(f"{source}: format version {header.get('version')} unsupported (this code reads {VERSION})")
    return header, 12 + hlen


def loads(blob: bytes, source: str = "<bytes>", kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Parse a container; returns (tensors, header). Checks size, checksum and kind."""
    header, start = _parse_header(blob, source)
    if kind is not None and header.get("kind") != kind:
        raise TensorFileError(f"{source}: holds {header.get('kind')!r} tensors, expected {kind!r}")
    payload = blob[start:]
    if len(payload) != header["payload_bytes"]:
        raise TensorFileError(f"{source}: truncated payload ({len(payload)} of {header['payload_bytes']} bytes)")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise TensorFileError(f"{source}: checksum mismatch (payload modified or corrupt)")
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise TensorFileError(f"{source}: corrupt header: no tensor table")
    out = {}
    for e in entries:
        _check_entry(e, len(payload), source)
        out[e["name"]] = from_buffer(payload, e["dtype"], e["shape"], e["offset"])
    return out, header


def _check_entry(e, payload_bytes: int, source: str) -> None:
    """A tensor-table entry must name a known dtype and a shape and byte range inside the payload
    (a checksum proves only that the payload matches the header, not that the header is sane)."""
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        raise TensorFileError(f"{source}: corrupt tensor table entry {e!r:.80}")
    name, dtype, shape, offset = e["name"], e.get("dtype"), e.get("shape"), e.get("offset")
    if dtype not in _DTYPES:
        raise TensorFileError(f"{source}: tensor {name!r} has unsupported dtype {dtype!r} "
                              f"(known: {', '.join(_DTYPES)})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise TensorFileError(f"{source}: tensor {name!r} has an invalid shape {shape!r}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype][1]).itemsize
    if type(offset) is not int or offset < 0 or offset + nbytes > payload_bytes:
        raise TensorFileError(f"{source}: tensor {name!r} ({dtype} {shape}) lies outside the payload "
                              f"(offset {offset!r}, {payload_bytes} payload bytes)")


def save(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, meta: dict | None = None) -> int:
    """Write atomically (temp name, then rename); returns the file size."""
    blob = dumps(tensors, kind, meta)
    atomic_write_bytes(path, blob)
    return len(blob)


def load(path: str | Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise TensorFileError(f"{path}: file not found")
    return loads(path.read_bytes(), str(path), kind)
