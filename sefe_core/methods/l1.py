"""The `l1` control: dense L1 on the new ΔW (mean over all positions, same λ and per-module mean
as RegLoRA), i.e. RegLoRA with a mask of 100%: shows what restricting the penalty buys."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sefe_core.methods import register
from sefe_core.methods.base import ContinualMethod, Penalty

if TYPE_CHECKING:
    from sefe_core.train_config import TrainConfig


@register
class L1(ContinualMethod):
    name = "l1"
    summary = "dense L1 on the new ΔW (control)"
    key_fields_need_priors = True

    def key_fields(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"reg_lambda": cfg.reg_lambda}

    def penalty(self, peft_model: Any, prior_task_dirs: Sequence[Path], cfg: TrainConfig) -> Penalty | None:
        from sefe_core.adapters import lora_factors
        from sefe_core.regularizer import Regularizer

        return Regularizer(lora_factors(peft_model), None) if prior_task_dirs else None

    def penalty_weight(self, cfg: TrainConfig) -> float:
        return cfg.reg_lambda
