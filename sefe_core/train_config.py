"""Per-task training settings (pydantic: a form in Prefect's UI), apart from the training code so a
config can be loaded without importing torch and transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"

# Values that differ from the reference setup in the `minicoin` preset: the ~1M-parameter tiny
# LLaVA on 2 CPU cores. 400 samples x 3 epochs at batch 16 = 75 optimizer steps per task (tuned on
# MiniCoIN seed 99, never on the demo's test split: lr 2e-3 learned more than 1e-3, MFT 58.5 vs
# 53.9); one core per training (two trainings run side by side, sefe_core.workers).
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    "minicoin": {
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "learning_rate": 2e-3,
        "projector_lr": 2e-4,
        "num_train_epochs": 3.0,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "bf16": False,
        "tf32": False,
        "gradient_checkpointing": False,
        "max_length": None,
        "save_steps": 50,
        "logging_steps": 10,
        "cpu_threads": 1,
    },
}


class TrainConfig(BaseModel):
    """Per-task training settings. Defaults = the reference setup (CoIN, LLaVA-1.5-7B, docs/design.md
    §1); `preset: minicoin` fills in small values for the tiny model on a CPU. Explicit fields
    win over the preset, except one that holds another preset's value (see `_apply_preset`)."""

    # inf/nan are refused here, not found later as NaN weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    preset: Literal["reference", "minicoin"] = "reference"
    # LoRA on every linear layer of the language model
    lora_r: int = Field(128, gt=0)
    lora_alpha: float = Field(256, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    # optimisation
    learning_rate: float = Field(2e-4, gt=0)
    train_projector: bool = True
    projector_lr: float = Field(2e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs (tests, smoke runs)
    per_device_train_batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(8, gt=0)  # 16 x 8 = the reference global batch 128
    max_length: int | None = Field(2048, gt=0)
    # batches of samples of similar length (LLaVA trains with group_by_modality_length): ASD's
    # 50-word answers otherwise pad every short answer of their batch to their length
    group_by_length: bool = True
    # numerics / memory (bf16 and tf32 apply on CUDA only)
    bf16: bool = True
    tf32: bool = True
    gradient_checkpointing: bool = True
    # RegLoRA (and the `l1` control): λ and M of the paper, named as in the reference scripts
    reg_lambda: float = Field(2.5e3, ge=0)
    mask_percent: float = Field(2.0, gt=0, le=100)
    # what a RegLoRA task keeps for the later ones: its mask (`file`: mask.safetensors, 4 bytes per
    # masked position) or only a digest of it (`recompute`: mask.digest.json; later tasks recompute
    # the mask from the task's adapter and check it against the digest). docs/design.md §1.2
    mask_storage: Literal["file", "recompute"] = "file"
    # any other method's own settings, by method name (e.g. {"olora": {"lambda_orth": 0.5}}),
    # validated by that method (sefe_core/methods/)
    method_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # bookkeeping (not part of the task's cache key)
    seed: int = 0
    save_steps: int = Field(500, gt=0)
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(10, gt=0)
    keep_checkpoints: bool = False
    # where Trainer also sends its logs: "none", "tensorboard" (event files in the task's
    # checkpoints/runs/, kept with keep_checkpoints; needs `pip install tensorboard`), "wandb", ...
    report_to: str | list[str] = "none"
    dataloader_num_workers: int = Field(0, ge=0)
    # torch intra-op threads while training on CPU (None: torch's default). The tiny model's
    # matrices are too small to share between cores, and with 2 threads on a busy 2-core machine
    # OpenMP's spin-waiting made a MiniCoIN task 14x slower (186 s vs 13 s), so minicoin uses 1.
    cpu_threads: int | None = Field(None, gt=0)
    deepspeed: str | None = None  # "zero2", "zero3" (shipped configs) or a path to a JSON config
    # GPUs one task trains on: > 1 launches `accelerate launch` (sefe_core.launch). Part of the
    # cache key: the global batch is per_device x accumulation x processes.
    num_processes: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The preset's values under the explicit fields. A field that holds *another* preset's
        value for it counts as not set: a form (Prefect's UI) submits every field, so switching
        only "preset" there must switch the values that came with the old one."""
        if isinstance(data, dict):
            preset = data.get("preset", "reference")
            if preset not in PRESETS:
                return data  # the Literal check reports it
            chosen = preset_values(preset)
            others = [preset_values(p) for p in PRESETS if p != preset]
            explicit = {
                k: v for k, v in data.items()
                if k not in chosen or v == chosen[k] or not any(v == o[k] for o in others)
            }  # fmt: skip
            return {**chosen, **explicit}
        return data

    @classmethod
    def minicoin(cls, **overrides: Any) -> TrainConfig:
        return cls(preset="minicoin", **overrides)

    def key_fields(self, method: str, first_task: bool = False) -> dict[str, Any]:
        """The fields that change what `method` learns on a task (its training key): the common
        learning fields, plus what the method itself reads (sefe_core/methods/: `reg_lambda`
        for the penalised ones, its `method_settings`). Not paths, logging or saving; not
        `mask_percent` (it shapes this task's mask, which the after-task step keys on; earlier
        tasks' masks enter through their digests); `mask_storage` only where a method reads it.
        `first_task`: the method's own fields only where they act without earlier tasks
        (`key_fields_need_priors`)."""
        from sefe_core.methods import method_of

        skip = {"preset", "save_steps", "save_total_limit", "logging_steps", "keep_checkpoints", "report_to"}
        skip |= {"dataloader_num_workers", "deepspeed", "cpu_threads", "mask_percent", "reg_lambda"}
        skip |= {"method_settings", "mask_storage"}  # the RegLoRA methods add it when not the default
        common = {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}
        m = method_of(method)
        return common if first_task and m.key_fields_need_priors else {**common, **m.key_fields(self)}

    def deepspeed_config(self) -> str | None:
        if self.deepspeed is None:
            return None
        shipped = CONFIG_DIR / f"{self.deepspeed}.json"
        path = shipped if shipped.exists() else Path(self.deepspeed)
        if not path.exists():
            raise FileNotFoundError(f"deepspeed config {self.deepspeed!r} is neither shipped nor a file")
        return str(path)


def preset_values(preset: str) -> dict[str, Any]:
    """Every field a preset sets, with its value (the class default where the preset keeps it)."""
    fields = {k for p in PRESETS.values() for k in p}
    return {k: PRESETS[preset].get(k, TrainConfig.model_fields[k].default) for k in fields}


def _run_default_preset(value: Any) -> Any:
    """In a run config the preset defaults to `minicoin`, the embedded default's CPU budget: a
    partial `train:` section (or `--set train.lr=...`) must not silently switch to the 7B setup."""
    if isinstance(value, dict) and "preset" not in value:
        return {"preset": "minicoin", **value}
    return value


# The type of RunConfig.train: a TrainConfig whose preset defaults to `minicoin`.
RunTrainConfig = Annotated[TrainConfig, BeforeValidator(_run_default_preset)]


def run_default() -> TrainConfig:
    return TrainConfig(preset="minicoin")
