"""Reading text corpora: documents (str) from .jsonl, .jsonl.zst and .txt files.

This module owns the one way the project reads raw text. A corpus is a file or a folder;
folders are walked recursively in sorted order, skipping any subfolder named `licenses`
(licence texts kept beside the data are not training text). Formats:

* `.jsonl` / `.jsonl.zst`: one JSON object per line with a string field "text";
* `.txt`: the whole file is one document.

Other files are ignored. Bad input raises `CorpusError` naming the file (and line).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

SKIP_DIRS = {"licenses"}


class CorpusError(ValueError):
    """A corpus path that is missing, empty, or holds a document we cannot read."""


def _is_doc_file(path: Path) -> bool:
    name = path.name
    return name.endswith(".jsonl") or name.endswith(".jsonl.zst") or name.endswith(".txt")


def corpus_files(path: str | Path) -> list[Path]:
    """The document files of a corpus path, in reading order."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: corpus path not found")
    if path.is_file():
        if not _is_doc_file(path):
            raise CorpusError(f"{path}: not a .jsonl, .jsonl.zst or .txt file")
        return [path]
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if any(part in SKIP_DIRS for part in rel[:-1]):
            continue
        if p.is_file() and _is_doc_file(p):
            files.append(p)
    return files


def _binary_lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as f:
            reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))
            yield from reader
    else:
        with open(path, "rb") as f:
            yield from f


def _jsonl_docs(path: Path) -> Iterator[str]:
    for lineno, raw in enumerate(_binary_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}: line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise CorpusError(f"{path}: line {lineno}: no \"text\" field")
        if not isinstance(obj["text"], str):
            raise CorpusError(f"{path}: line {lineno}: \"text\" is {type(obj['text']).__name__}, not a string")
        yield obj["text"]


def _txt_doc(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise CorpusError(f"{path}: line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_documents(path: str | Path) -> Iterator[str]:
    """Every document of the corpus at `path`, in order; CorpusError if it holds none."""
    files = corpus_files(path)
    if not files:
        raise CorpusError(f"{path}: empty corpus (no .jsonl, .jsonl.zst or .txt files)")
    count = 0
    for f in files:
        if f.name.endswith(".txt"):
            count += 1
            yield _txt_doc(f)
        else:
            for doc in _jsonl_docs(f):
                count += 1
                yield doc
    if count == 0:
        raise CorpusError(f"{path}: empty corpus (files found but no documents in them)")


def read_documents(path: str | Path, limit: int = 0) -> list[str]:
    """The documents of a corpus as a list (the first `limit` when limit > 0)."""
    it = iter_documents(path)
    if limit > 0:
        docs = list(islice(it, limit))
        it.close()
        return docs
    return list(it)
