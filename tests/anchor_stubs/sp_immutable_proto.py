"""Test-only stand-in for sentencepiece's `encode_as_immutable_proto`, so the PR #2135 anchor's
`prepare_caseops_data.py` runs with the sentencepiece of our venv (0.2.3). Never used by pgolf itself.

sentencepiece 0.2.2 removed `encode_as_immutable_proto` ("immutable_proto is deprecated"). In
0.2.1 it wrapped the C++ `SentencePieceText` proto of one encoding; 0.2.3 still returns that same
proto, serialized, from `encode(text, out_type="serialized_proto")`. `install()` adds a method of
that name which parses those bytes (protobuf wire format, no protobuf package needed) into objects
with the fields the 0.2.1 API had: `.text`, `.score`, `.pieces`, and per piece `.piece`, `.id`,
`.surface`, `.begin`, `.end`. The anchor reads only `piece.surface`.

Checked against sentencepiece 0.2.1 itself (`python -m bench.caseops_oracle --anchor-python PY`, PY
a venv's python with `pip install sentencepiece==0.2.1 numpy`): the anchor's output under 0.2.1 and
under this stand-in is byte-identical, 2,607,053 validation tokens and byte counts (the 901
validation documents + 500 proxy-corpus documents) and 4,357,628 training tokens
(bench/results/caseops_oracle.json, `anchor_shim_vs_anchor_sp021`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import sentencepiece as spm


@dataclass
class Piece:
    piece: str = ""
    id: int = 0
    surface: str = ""
    begin: int = 0
    end: int = 0


@dataclass
class SentencePieceText:
    text: str = ""
    score: float = 0.0
    pieces: list = field(default_factory=list)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, val


def parse(serialized: bytes) -> SentencePieceText:
    """SentencePieceText {1: text, 2: pieces {1: piece, 2: id, 3: surface, 4: begin, 5: end}, 3: score}."""
    out = SentencePieceText()
    for num, _, val in _fields(serialized):
        if num == 1:
            out.text = val.decode("utf-8")
        elif num == 3:
            out.score = struct.unpack("<f", val)[0]
        elif num == 2:
            p = Piece()
            for n, _, v in _fields(val):
                if n == 1:
                    p.piece = v.decode("utf-8")
                elif n == 2:
                    p.id = v
                elif n == 3:
                    p.surface = v.decode("utf-8")
                elif n == 4:
                    p.begin = v
                elif n == 5:
                    p.end = v
            out.pieces.append(p)
    return out


def encode_as_immutable_proto(self, text: str) -> SentencePieceText:
    return parse(self.encode(text, out_type="serialized_proto"))


def install() -> None:
    """Give SentencePieceProcessor the method where this sentencepiece lacks it."""
    if not hasattr(spm.SentencePieceProcessor, "encode_as_immutable_proto"):
        spm.SentencePieceProcessor.encode_as_immutable_proto = encode_as_immutable_proto
