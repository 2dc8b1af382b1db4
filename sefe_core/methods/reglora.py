"""RegLoRA (docs/design.md §1.2): after task k its mask R_k (top M% of |ΔW_k| per module) is saved;
while task k+1 trains, the loss gains λ · mean_modules(mean_{p ∈ R_1 ⊎ … ⊎ R_k} |ΔW_{k+1}[p]|).

`reglora-random` is its control with the same budget: a random mask of the same size per
module, so a comparison shows what the top-M% selection itself buys. Settings: the paper's
`train.reg_lambda` (λ) and `train.mask_percent` (M), kept in the train section as in the
reference scripts; `train.mask_storage` (keep the mask, or only its digest and recompute it);
and `train.method_settings.reglora.target` (the paper's ablation: the mask and the penalty on
ΔW = B @ A, the default, or on the factors `a`, `b` or both, `ab`). The control reads the same
`method_settings.reglora` (a control must differ from its method only in how the mask is drawn),
and a `method_settings.reglora-random` entry is refused rather than ignored.

Keys: the target and the storage enter the train and after-task keys only when not the default,
so a default run's keys (and its mask file's bytes) are as before they existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from sefe_core.methods import register
from sefe_core.methods.base import ContinualMethod, Penalty

if TYPE_CHECKING:
    from sefe_core.train_config import TrainConfig

MASK_FILE = "mask.safetensors"  # = sefe_core.mask.MASK_FILE (that module imports torch)
DIGEST_FILE = "mask.digest.json"  # = sefe_core.mask.DIGEST_FILE
DEFAULT_TARGET = "delta_w"
SETTINGS_NAME = "reglora"  # both RegLoRA methods read train.method_settings.reglora


class RegLoRASettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # which matrix the mask and the penalty are on: ΔW = B @ A, A (r x in), B (out x r), or both factors
    target: Literal["delta_w", "a", "b", "ab"] = DEFAULT_TARGET


@register
class RegLoRA(ContinualMethod):
    name = "reglora"
    summary = "LoRA penalised on the earlier tasks' top-M% ΔW positions"
    key_fields_need_priors = True  # λ and the target act from task 2 on (base.py)
    artifact = MASK_FILE  # or DIGEST_FILE with mask_storage: recompute (artifact_name)
    mask_kind: ClassVar[str] = "topk"
    Settings = RegLoRASettings

    def settings(self, cfg: TrainConfig) -> RegLoRASettings:
        if self.name != SETTINGS_NAME and self.name in cfg.method_settings:
            raise ValueError(
                f"train.method_settings.{self.name}: {self.name} reads train.method_settings.{SETTINGS_NAME} "
                "(a control shares its method's settings)"
            )
        try:
            return RegLoRASettings.model_validate(cfg.method_settings.get(SETTINGS_NAME, {}))
        except Exception as e:
            raise ValueError(f"train.method_settings.{SETTINGS_NAME}: {e}") from e

    def _non_default(self, cfg: TrainConfig) -> dict[str, Any]:
        """Target and storage, each only when not the default (a default run's keys are unchanged)."""
        out: dict[str, Any] = {}
        target = self.settings(cfg).target
        if target != DEFAULT_TARGET:
            out["target"] = target
        if cfg.mask_storage != "file":
            out["mask_storage"] = cfg.mask_storage
        return out

    def artifact_name(self, cfg: TrainConfig | None) -> str:
        return DIGEST_FILE if cfg is not None and cfg.mask_storage == "recompute" else MASK_FILE

    def key_fields(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"reg_lambda": cfg.reg_lambda, **self._non_default(cfg)}

    def penalty(self, peft_model: Any, prior_task_dirs: Sequence[Path], cfg: TrainConfig) -> Penalty | None:
        from sefe_core.adapters import lora_factors
        from sefe_core.regularizer import masked_regularizer

        target = self.settings(cfg).target
        if not prior_task_dirs:  # nothing to protect on the first task
            return None
        factors = lora_factors(peft_model)
        if cfg.mask_storage == "recompute":
            from sefe_core.mask import recompute_task_mask

            device = factors[0].a.device
            masks: list[Any] = [recompute_task_mask(d, target, device) for d in prior_task_dirs]
        else:
            masks = [str(Path(d) / MASK_FILE) for d in prior_task_dirs]
        return masked_regularizer(factors, masks, target)

    def penalty_weight(self, cfg: TrainConfig) -> float:
        return cfg.reg_lambda

    def after_task(self, task_dir: Path, cfg: TrainConfig) -> Path:
        from sefe_core.mask import digest_task_mask, extract_task_mask

        save = digest_task_mask if cfg.mask_storage == "recompute" else extract_task_mask
        return save(task_dir, cfg.mask_percent, self.mask_kind, cfg.seed, self.settings(cfg).target)

    def after_task_key(self, cfg: TrainConfig) -> dict[str, Any]:
        return {
            "mask_percent": cfg.mask_percent,
            "kind": self.mask_kind,
            "seed": cfg.seed,
            **self._non_default(cfg),
        }

    def prior_key(self, prior_task_dir: Path) -> Any:
        """Which adapter, percent, kind and seed (and target, when not ΔW) the earlier mask was
        made from: the mask file's metadata, or the digest's where only that was kept."""
        from sefe_core.mask import mask_metadata, read_mask_digest

        d = Path(prior_task_dir)
        meta = mask_metadata(d / MASK_FILE) or read_mask_digest(d / DIGEST_FILE) or {}
        out = {k: meta.get(k) for k in ("percent", "kind", "source")}
        if meta.get("target", DEFAULT_TARGET) != DEFAULT_TARGET:
            out["target"] = meta["target"]
        return out


@register
class RegLoRARandom(RegLoRA):
    name = "reglora-random"
    summary = "RegLoRA's control: a random mask of the same size"
    mask_kind = "random"
