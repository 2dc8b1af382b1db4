"""The continual methods: which penalty each adds and which mask it extracts (light: no torch,
so a config can be validated and a finished run shown without importing the training stack)."""

from __future__ import annotations

from typing import Literal

# method -> (penalty kind, mask kind). `asd` and `sefe` are `lora` / `reglora` fed ASD data.
METHODS: dict[str, tuple[Literal["none", "mask", "l1"], Literal["topk", "random"]]] = {
    "lora": ("none", "topk"),
    "asd": ("none", "topk"),
    "reglora": ("mask", "topk"),
    "sefe": ("mask", "topk"),
    "reglora-random": ("mask", "random"),
    "l1": ("l1", "topk"),
}


def uses_asd(method: str) -> bool:
    """`asd` and `sefe` train on the ASD output instead of the benchmark's original records."""
    check_method(method)
    return method in ("asd", "sefe")


def check_method(method: str) -> tuple[str, str]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]
