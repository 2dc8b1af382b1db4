"""Stable hashes and seeds: Python's hash() of str changes per process, so everything that keys
a cache or seeds a generator goes through sha256 of a canonical JSON encoding instead."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump"):  # pydantic models
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    return obj


def config_hash(obj: Any, length: int = 16) -> str:
    """Hash of a config (dataclass, pydantic model, dict): equal configs give equal hashes."""
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed derived from `parts`, identical in every process and on every machine."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
