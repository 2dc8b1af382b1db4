"""The continual methods, registered by name, and the run variants built from them.

A *variant* is what `methods:` in a run config lists and what names a method's run directory:
a method trained on one of two data sources (`data: original | asd`, the ASD axis of the paper):

    lora, reglora, reglora-random, l1, olora   a registered method on the original records
    <method>+asd                               the same method on the ASD output
    asd = lora+asd, sefe = reglora+asd         the paper's names, kept as shorthands

Adding a method: one module in this package defining a `ContinualMethod` subclass decorated
with `@register`, and its import below (the registry entry). No torch at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sefe_core.methods.base import ContinualMethod

REGISTRY: dict[str, ContinualMethod] = {}


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls()
    return cls


# The registry entries: importing a module registers its methods, in the order a reader
# compares them (reports list methods in this order, each followed by its +asd variant).
from sefe_core.methods import lora  # noqa: E402, F401, I001
from sefe_core.methods import reglora  # noqa: E402, F401
from sefe_core.methods import l1  # noqa: E402, F401
from sefe_core.methods import olora  # noqa: E402, F401

ASD_SUFFIX = "+asd"
SHORTHANDS: dict[str, str] = {"asd": "lora+asd", "sefe": "reglora+asd"}


@dataclass(frozen=True)
class Variant:
    """One entry of `methods:`: a registered method and the data it trains on."""

    name: str
    method: ContinualMethod
    data: Literal["original", "asd"]


def variant(name: str) -> Variant:
    full = SHORTHANDS.get(name, name)
    base, asd = (full[: -len(ASD_SUFFIX)], True) if full.endswith(ASD_SUFFIX) else (full, False)
    if base not in REGISTRY:
        known = [*REGISTRY, *SHORTHANDS, *(f"{m}{ASD_SUFFIX}" for m in REGISTRY)]
        raise ValueError(f"unknown method {name!r}; known: {', '.join(known)}")
    return Variant(name, REGISTRY[base], "asd" if asd else "original")


def ordered(names: Sequence[str]) -> list[str]:
    """Variant names in reading order: by registered method, each before its +asd variant; names
    that are not variants (a foreign run directory) last, alphabetically."""
    order = list(REGISTRY)

    def key(name: str) -> tuple[int, bool, str]:
        try:
            v = variant(name)
        except ValueError:
            return (len(order), True, name)
        return (order.index(v.method.name), v.data != "original", name)

    return sorted(names, key=key)


def method_of(name: str) -> ContinualMethod:
    """The registered method behind a variant name (`sefe` -> RegLoRA)."""
    return variant(name).method


def uses_asd(name: str) -> bool:
    """Whether the variant trains on the ASD output instead of the benchmark's original records."""
    return variant(name).data == "asd"


__all__ = [
    "REGISTRY",
    "SHORTHANDS",
    "ContinualMethod",
    "Variant",
    "method_of",
    "ordered",
    "register",
    "uses_asd",
    "variant",
]
