"""LoRA adapters on a LLaVA-class model: which modules get one, their factors (in a live peft
model or a saved adapter), and a fresh one for a new task (docs/design.md §1.3).

A saved adapter is `adapter/` (peft's save_pretrained: adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from sefe_core.train_config import TrainConfig

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def language_model_prefix(model: torch.nn.Module) -> str:
    """Dotted name of the language model inside a Llava-class model (`model.language_model`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if module is decoder and name:
            return name
    for name, _ in model.named_modules():  # fallback for models without get_decoder
        if name.endswith("language_model"):
            return name
    raise ValueError(
        f"{type(model).__name__}: cannot find the language model (no get_decoder / language_model)"
    )


def lora_target_regex(model: torch.nn.Module) -> str:
    """A peft `target_modules` regex for every nn.Linear of the language model and nothing else.

    `"all-linear"` would also wrap the vision tower and the projector (docs/design.md §7); the lm_head
    sits outside the language model and is excluded too, as in LLaVA's LoRA setup.
    """
    prefix = language_model_prefix(model)
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(prefix + ".")
        }
    )
    if not leaves:
        raise ValueError(f"no nn.Linear under {prefix!r}")
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})$"


@dataclass(frozen=True)
class LoraFactors:
    """The trainable factors of one LoRA module: A (r, in), B (out, r); ΔW = B @ A (unscaled)."""

    name: str  # module name in the plain (merged) model, e.g. model.language_model.layers.0.mlp.up_proj
    a: torch.Tensor
    b: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])


def lora_factors(peft_model: torch.nn.Module, adapter: str = "default") -> list[LoraFactors]:
    """The factors of `adapter` in every LoRA module of a peft model, named as in the base model."""
    out = []
    for name, module in peft_model.named_modules():
        la, lb = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(la, torch.nn.ModuleDict) and adapter in la:
            base_name = name.removeprefix("base_model.model.")
            out.append(LoraFactors(base_name, la[adapter].weight, lb[adapter].weight))
    if not out:
        raise ValueError(f"the model has no LoRA modules for adapter {adapter!r}")
    return out


def adapter_factors(adapter_dir: str | Path) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, A, B) read one module at a time from a saved peft adapter."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}")
    pattern = re.compile(r"^base_model\.model\.(.+)\.lora_A(?:\.[^.]+)?\.weight$")
    with safe_open(str(path), framework="pt") as f:
        a_keys = {m.group(1): k for k in f.keys() if (m := pattern.match(k))}
        if not a_keys:
            raise ValueError(f"{path}: no LoRA A/B weights found")
        for name in sorted(a_keys):
            a_key = a_keys[name]
            yield name, f.get_tensor(a_key), f.get_tensor(a_key.replace(".lora_A", ".lora_B"))


def attach_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """A fresh LoRA (adapter "default") on every linear layer of the language model; the
    projector trainable when `cfg.train_projector`; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_regex(model),
        bias="none",
    )
    peft_model = get_peft_model(model, lora)
    if cfg.train_projector:
        from sefe_core.stage import projector_module

        _, module = projector_module(peft_model)
        for p in module.parameters():
            p.requires_grad_(True)
    return peft_model
