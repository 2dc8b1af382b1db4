"""RegLoRA (docs/design.md §1.2): after task k its mask R_k (top M% of |ΔW_k| per module) is saved;
while task k+1 trains, the loss gains λ · mean_modules(mean_{p ∈ R_1 ⊎ … ⊎ R_k} |ΔW_{k+1}[p]|).

`reglora-random` is its control with the same budget: a random mask of the same size per
module, so a comparison shows what the top-M% selection itself buys. Settings: the paper's
`train.reg_lambda` (λ) and `train.mask_percent` (M), kept in the train section as in the
reference scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sefe_core.methods import register
from sefe_core.methods.base import ContinualMethod, Penalty

if TYPE_CHECKING:
    from sefe_core.train_config import TrainConfig

MASK_FILE = "mask.safetensors"  # = sefe_core.mask.MASK_FILE (that module imports torch)


@register
class RegLoRA(ContinualMethod):
    name = "reglora"
    summary = "LoRA penalised on the earlier tasks' top-M% ΔW positions"
    artifact = MASK_FILE
    mask_kind: ClassVar[str] = "topk"

    def key_fields(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"reg_lambda": cfg.reg_lambda}

    def penalty(self, peft_model: Any, prior_task_dirs: Sequence[Path], cfg: TrainConfig) -> Penalty | None:
        from sefe_core.adapters import lora_factors
        from sefe_core.regularizer import masked_regularizer

        if not prior_task_dirs:  # nothing to protect on the first task
            return None
        return masked_regularizer(
            lora_factors(peft_model), [str(Path(d) / MASK_FILE) for d in prior_task_dirs]
        )

    def penalty_weight(self, cfg: TrainConfig) -> float:
        return cfg.reg_lambda

    def after_task(self, task_dir: Path, cfg: TrainConfig) -> Path:
        from sefe_core.mask import extract_task_mask

        return extract_task_mask(task_dir, cfg.mask_percent, self.mask_kind, cfg.seed)

    def after_task_key(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"mask_percent": cfg.mask_percent, "kind": self.mask_kind, "seed": cfg.seed}

    def prior_key(self, prior_task_dir: Path) -> Any:
        """Which adapter, percent, kind and seed the earlier mask was made from (its metadata)."""
        from sefe_core.mask import mask_metadata

        meta = mask_metadata(Path(prior_task_dir) / MASK_FILE) or {}
        return {k: meta.get(k) for k in ("percent", "kind", "source")}


@register
class RegLoRARandom(RegLoRA):
    name = "reglora-random"
    summary = "RegLoRA's control: a random mask of the same size"
    mask_kind = "random"
