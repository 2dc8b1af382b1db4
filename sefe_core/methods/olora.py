"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning"; a baseline in the SEFE paper's table): the new task's LoRA learns in a subspace
orthogonal to the earlier tasks' LoRA subspaces. With A_t (r x in) the down-projection of
task t's adapter in a module, the penalty of the new adapter (A, B) is

    λ_orth · Σ_modules Σ_{t<k} Σ_ij |(A A_tᵀ)_ij|  +  λ_l2 · Σ_{new LoRA params} ‖θ‖₂

as in the authors' trainer (absolute values of the r x r overlaps; their default λ_orth = 0.5,
λ_l2 = 0). It reads only the earlier adapters, which every task already keeps, so it saves
nothing after a task; stages merge as for plain LoRA (the earlier adapters are frozen, and a
frozen LoRA merged into W computes the same function).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from sefe_core.methods import register
from sefe_core.methods.base import ContinualMethod, Penalty

if TYPE_CHECKING:
    import torch

    from sefe_core.train_config import TrainConfig


class OLoRASettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lambda_orth: float = Field(0.5, ge=0)
    lambda_l2: float = Field(0.0, ge=0)


class OrthogonalPenalty:
    """λ_orth · Σ |A_new A_oldᵀ| + λ_l2 · Σ ‖θ_new‖, with the earlier A's stacked per module."""

    def __init__(self, factors: Sequence[Any], old_a: dict[str, torch.Tensor], s: OLoRASettings) -> None:
        missing = [f.name for f in factors if f.name not in old_a]
        if missing:
            raise ValueError(f"earlier adapters do not cover the new LoRA modules, e.g. {missing[:3]}")
        self.factors, self.old_a, self.s = list(factors), old_a, s

    def __call__(self) -> torch.Tensor:
        import torch

        orth = sum((f.a @ self.old_a[f.name].t()).abs().sum() for f in self.factors)
        if not self.s.lambda_l2:
            return self.s.lambda_orth * orth
        l2 = sum(torch.linalg.vector_norm(f.a) + torch.linalg.vector_norm(f.b) for f in self.factors)
        return self.s.lambda_orth * orth + self.s.lambda_l2 * l2


@register
class OLoRA(ContinualMethod):
    name = "olora"
    summary = "LoRA kept orthogonal to the earlier tasks' LoRA subspaces (O-LoRA)"
    Settings = OLoRASettings

    def penalty(self, peft_model: Any, prior_task_dirs: Sequence[Path], cfg: TrainConfig) -> Penalty | None:
        import torch

        from sefe_core.adapters import ADAPTER_DIR, adapter_factors, lora_factors

        if not prior_task_dirs:
            return None
        factors = lora_factors(peft_model)
        device, dtype = factors[0].a.device, factors[0].a.dtype
        stacked: dict[str, list[torch.Tensor]] = {}
        for d in prior_task_dirs:
            for name, a, _ in adapter_factors(Path(d) / ADAPTER_DIR):
                stacked.setdefault(name, []).append(a.to(device, dtype))
        old_a = {name: torch.cat(parts) for name, parts in stacked.items()}
        return OrthogonalPenalty(factors, old_a, self.settings(cfg))

    def penalty_weight(self, cfg: TrainConfig) -> float:
        return 1.0  # the two λ's are inside the penalty
