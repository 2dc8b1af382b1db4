"""One process per run directory.

Two pipelines writing the same run directory would race on checkpoints and Parquet files. An
advisory `flock` on `<run_dir>/.lock` makes the second one fail at once with a message naming the
holder; the kernel drops the lock when the holder dies (even by SIGKILL), so a crashed run never
leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RunDirectoryBusy(RuntimeError):
    pass


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirectoryBusy(
                f"run directory {run_dir} is in use by another run ({holder}); wait for it to finish "
                f"or use another experiment name"
            ) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
