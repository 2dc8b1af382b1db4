"""Stages (docs/design.md §3): the model after task k is the base with adapters 1..k merged in
memory, never stored; `export_merged` writes one on request. The projector, when trained, is
saved per task (`projector.safetensors`) and loaded before that task's LoRA is merged."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from sefe_core.adapters import ADAPTER_DIR, adapter_factors

PROJECTOR_FILE = "projector.safetensors"


def projector_module(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The vision-to-language projector of a Llava-class model (`multi_modal_projector`)."""
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            return name, module
    raise ValueError(f"{type(model).__name__} has no multi_modal_projector")


def _gathered(params: list[torch.nn.Parameter]):
    """Whole parameters for reading: under DeepSpeed ZeRO-3 they are partitioned (`ds_id`)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_projector(model: torch.nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    _, module = projector_module(model)
    with _gathered(list(module.parameters())):
        state = {n: t.detach().cpu().clone().contiguous() for n, t in module.state_dict().items()}
    save_file(state, str(path))


def load_projector(model: torch.nn.Module, path: str | Path) -> None:
    from safetensors.torch import load_file

    _, module = projector_module(model)
    module.load_state_dict(load_file(str(path), device=str(next(module.parameters()).device)))


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def merge_task(model: torch.nn.Module, task_dir: str | Path) -> torch.nn.Module:
    """Merge one finished task (its projector, then its LoRA) into `model`, in place.

    Plain LoRA adapters (ours) are merged directly: W += (alpha / r) * B @ A per module, one
    module at a time; that is peft's merge, without building a PeftModel around the whole model
    (170 ms per adapter on the tiny model, most of a MiniCoIN task's overhead; tested equal to
    peft's merge_and_unload). Anything else (DoRA, rank patterns, ...) goes through peft."""
    task_dir = Path(task_dir)
    adapter = task_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{task_dir} has no finished adapter ({adapter})")
    proj = task_dir / PROJECTOR_FILE
    if proj.exists():
        load_projector(model, proj)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    plain = acfg.get("peft_type") == "LORA" and not any(
        acfg.get(k)
        for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save")
    )
    if not plain:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
    r = acfg["r"]
    scale = acfg["lora_alpha"] / (math.sqrt(r) if acfg.get("use_rslora") else r)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a, b in adapter_factors(adapter):
            weight = params.get(f"{name}.weight")
            if weight is None:
                raise ValueError(f"{adapter}: LoRA module {name!r} is not in the model")
            dw = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
            weight.add_((scale * dw).to(weight.dtype))
    return model


def stage_model(
    base_path: str | Path,
    task_dirs: Sequence[str | Path],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """(model, processor) after the tasks in `task_dirs`: the base with their adapters merged."""
    from sefe_core.vlm import load_vlm

    model, processor = load_vlm(
        base_path, dtype=dtype, device=device or _default_device(), trust_remote_code=trust_remote_code
    )
    for d in task_dirs:
        model = merge_task(model, d)
    return model, processor


def export_merged(
    base_path: str | Path,
    task_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write the stage after `task_dirs` as a full checkpoint (`vlm.save_vlm`: a layout vLLM
    and transformers both load), atomically."""
    from data_contracts import atomic_path
    from sefe_core.vlm import save_vlm

    model, processor = stage_model(base_path, task_dirs, dtype=dtype, trust_remote_code=trust_remote_code)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        save_vlm(model, processor, tmp)
    return out_dir
