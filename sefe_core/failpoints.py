"""Named crash points, to test that a run killed anywhere resumes correctly.

    SEFE_FAILPOINTS="train.checkpoint:2"  sefe run

makes the process kill itself with SIGKILL (no cleanup, no `finally`, exactly as `kill -9` or an
OOM kill would) the 2nd time it reaches `failpoint("train.checkpoint")`. In a worker process
(`sefe_core.workers`) it kills the run's main process first, so the whole run dies as one. Several points:
`"asd.shard:1,eval.task:3"`. Unset (always, outside tests), `failpoint` is a dictionary lookup.

Points: `asd.shard` (a shard of ASD output written), `train.checkpoint` (a Trainer checkpoint
saved, mid-task), `eval.task` (one eval task's predictions generated, before the stage's file is
written).
"""

from __future__ import annotations

import os
import signal

ENV = "SEFE_FAILPOINTS"


def _armed() -> dict[str, int]:
    spec = os.environ.get(ENV, "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        out[name] = int(n or 1)
    return out


def _hit(name: str) -> int:
    """How often `name` was reached in this run, counted across the run's worker processes (a
    file next to the temp dir, keyed by the main process), so `train.checkpoint:5` means the 5th
    checkpoint of the run whichever worker writes it."""
    import fcntl
    import tempfile

    main = os.environ.get("SEFE_MAIN_PID", str(os.getpid()))
    path = os.path.join(tempfile.gettempdir(), f"sefe-failpoints-{main}-{name}")
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
    return n


def failpoint(name: str) -> None:
    if ENV not in os.environ:
        return
    armed = _armed()
    if name not in armed:
        return
    if _hit(name) == armed[name]:
        main = int(os.environ.get("SEFE_MAIN_PID", os.getpid()))  # a worker takes its run with it
        if main != os.getpid():
            os.kill(main, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
