"""Process-wide work counters (training steps, generated answers).

They let a caller prove that a rerun did no work: a cached step never calls into sefe_core, so
the counters stay at zero. Kept in-process and cheap; not an artifact.
"""

from __future__ import annotations

import threading
from collections import Counter

_COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()  # evaluation of stage k runs in a thread while task k+1 trains


def add(name: str, n: int = 1) -> None:
    with _LOCK:
        _COUNTS[name] += n


def get(name: str) -> int:
    return _COUNTS[name]


def snapshot() -> dict[str, int]:
    return dict(_COUNTS)
