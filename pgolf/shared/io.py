"""Small I/O helpers shared by every stage: atomic writes, metrics JSON, file checksums.

Every output goes through a temp name and a rename, so a crash never leaves a half-written
file behind, and a failed stage never destroys the previous good output it was replacing. A
write that the system refuses (disk full, file too large, read-only folder) is an OutputError
naming the file; a metrics file that is not JSON is a MetricsError naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputError(OSError):
    """An output that could not be written; the message names it and says why."""

    def __init__(self, path: Path, why: str, errno_: int | None = None):
        self.path, self.why = Path(path), why
        super().__init__(f"{path}: cannot write ({why}, errno {errno_}); the previous version, if any, is unchanged")
        self.errno = errno_

    def moved(self, src: Path, dst: Path) -> OutputError:
        """The same error for the file's final place `dst/...` when it was written under `src/`."""
        try:
            return OutputError(dst / self.path.relative_to(src), self.why, self.errno)
        except ValueError:
            return self


class MetricsError(ValueError):
    """A JSON file (metrics, tables) that is missing or not valid JSON; names the file."""


def _cannot_write(path: Path, e: OSError) -> OutputError:
    return OutputError(path, e.strerror or str(e), e.errno)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file + rename; the file gets normal permissions (0666 & ~umask)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict:
    """The JSON object in `path`; MetricsError naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.exists():
        raise MetricsError(f"{path}: not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetricsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise MetricsError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


@contextmanager
def staged_dir(final: str | Path):
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    On an exception the temp folder is removed and `final` is left as it was.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise _cannot_write(final, e) from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError):  # name the file's final place, not the temp folder
            raise e.moved(tmp, final) from None
        raise
    old = final.with_name(f".{final.name}.old")
    try:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except OSError as e:
        if old.exists() and not final.exists():
            old.rename(final)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cannot_write(final, e) from None
    shutil.rmtree(old, ignore_errors=True)
