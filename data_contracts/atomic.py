"""Atomic file writes and content digests, shared by every artifact writer.

Every artifact appears whole or not at all: writers fill a temp file in the same directory and
rename it over the target (rename is atomic on POSIX), so a killed process never leaves a
half-written file that a resumed run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FileInfo:
    path: str
    sha256: str
    bytes: int


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path (file or directory) next to `path`; rename it onto `path` only if the
    block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> FileInfo:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return file_info(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_HASHED: dict[tuple[str, int, int], str] = {}


def sha256_once(path: str | Path) -> str:
    """sha256 of a file, computed once per process for each (path, size, mtime) it is seen with:
    a run checks every file it reads against its record (an adapter at 7B takes about a second to
    hash) without hashing it again at every step."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def mismatched(path: str | Path, sha256: str) -> str | None:
    """Why `path` is not the file recorded with `sha256` (None when it is)."""
    p = Path(path)
    if not p.is_file():
        return f"{p} is missing"
    if sha256_once(p) != sha256:
        return f"{p} is not the file its record says (sha256 differs: damaged or replaced)"
    return None


def file_info(path: str | Path) -> FileInfo:
    path = Path(path)
    return FileInfo(path=str(path), sha256=sha256_file(path), bytes=path.stat().st_size)
