"""Plain LoRA: a fresh adapter per task on the stage so far, no penalty (the lower bound)."""

from __future__ import annotations

from sefe_core.methods import register
from sefe_core.methods.base import ContinualMethod


@register
class LoRA(ContinualMethod):
    name = "lora"
    summary = "a fresh LoRA per task, no penalty"
