"""Per-task continual training (DESIGN.md §1.2, §3, §4): a fresh LoRA per task on the model that
holds tasks 1..k-1, with the RegLoRA penalty (or a control) against the earlier tasks' masks.

One task leaves `<run_dir>/<method>/task-<name>/`:

    adapter/                 peft save_pretrained of this task's LoRA only
    projector.safetensors    the projector after this task (when it is trained)
    mask.safetensors         this task's own mask (sorted int32 flat indices per module)
    checkpoints/             Trainer checkpoints while the task runs (removed when it ends)
    train.json               written last: steps, seconds, final loss, config hash

The model after task k (a *stage*) is never stored: `stage_model` rebuilds it from the base and
adapters 1..k, merged in memory; `export_merged` writes it on request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from sefe_core.failpoints import failpoint
from sefe_core.reglora import MASK_FILE
from sefe_core.train_config import PRESETS, RunTrainConfig, TrainConfig, run_default  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
TRAIN_JSON = "train.json"
CHECKPOINTS = "checkpoints"
KEY_FILE = "sefe_task_key.json"  # inside checkpoints/: which config the checkpoints belong to


@dataclass(frozen=True)
class TrainResult:
    """What one task left on disk (paths, not tensors) and what this call did."""

    task_dir: Path
    adapter_dir: Path
    mask_path: Path
    projector_path: Path | None
    train_json: Path
    config_hash: str
    global_step: int  # optimizer steps of the whole task
    steps_run: int  # optimizer steps run by this call (0 when the task was already done)
    train_samples: int
    seconds: float  # wall time of this call's training
    final_loss: float
    resumed_from: str | None
    reused: bool

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# --------------------------------------------------------------------------------------------
# Stages: base + adapters 1..k merged in memory
# --------------------------------------------------------------------------------------------
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
    from sefe_core.reglora import adapter_factors

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
    """Write the stage after `task_dirs` as a full checkpoint (save_pretrained), atomically."""
    from data_contracts import atomic_path

    model, processor = stage_model(base_path, task_dirs, dtype=dtype, trust_remote_code=trust_remote_code)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


# --------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------
class _GroupedByLength(LengthGroupedSampler):
    """Length-grouped batches over mega-batches of 8 batches. Trainer's sampler sizes mega-batches
    by the dataset (fewer than 4 batches' worth per mega-batch on a small task: no grouping at
    all), which left a MiniCoIN ASD task at 2.4x the tokens of its original records."""

    def __iter__(self):
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, 8, generator=self.generator))


class SEFETrainer(Trainer):
    """Trainer + the RegLoRA penalty, a projector learning rate, and the projector in checkpoints.

    Gradient accumulation: the CE the model returns is already normalised over the whole
    accumulated batch when `num_items_in_batch` is given, so Trainer does not divide it; an
    extra term added here would then count once per micro-batch. We therefore scale both
    parts ourselves (penalty / micro-batches of this step) and tell Trainer the loss is
    scaled. GA=n x batch b then gives the gradients of GA=1 x batch n·b (tests/test_train.py).
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, regularizer=None, reg_lambda: float = 0.0, projector_lr=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self.reg_lambda = reg_lambda
        self.projector_lr = projector_lr
        self._pen_sum, self._pen_n = 0.0, 0
        self.last_penalty: float | None = None

    # -- optimizer: LoRA at learning_rate, projector at projector_lr --------------------
    def _projector_params(self) -> dict[str, torch.nn.Parameter]:
        return {
            n: p
            for n, p in self.model.named_parameters()
            if p.requires_grad and ".multi_modal_projector." in f".{n}"
        }

    def create_optimizer(self, model=None):
        proj = self._projector_params()
        if self.optimizer is not None or not proj or self.projector_lr is None:
            return super().create_optimizer(model)
        ids = {id(p) for p in proj.values()}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        groups = [
            {"params": rest, "weight_decay": self.args.weight_decay},
            {"params": list(proj.values()), "weight_decay": 0.0, "lr": self.projector_lr},
        ]
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches need lengths; our samples are raw text (tokenised in the
        collator), so the dataset gives a cheap word count instead."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return _GroupedByLength(batch, lengths=dataset.lengths())
        return super()._get_train_sampler(train_dataset)

    # -- loss -------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss, outputs = out
        if model.training:
            micro = self.current_gradient_accumulation_steps
            ce_scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
            if not ce_scaled:
                loss = loss / micro
            if self.regularizer is not None:
                pen = self.regularizer()
                loss = loss + (self.reg_lambda / micro) * pen
                self._pen_sum += float(pen.detach())
                self._pen_n += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._pen_n and "loss" in logs:
            self.last_penalty = self._pen_sum / self._pen_n
            logs["reg_penalty"] = self.last_penalty
            self._pen_sum, self._pen_n = 0.0, 0
        super().log(logs, start_time)

    # -- the projector travels with every checkpoint ---------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self._projector_params() and self.args.should_save:
            save_projector(self.model, Path(output_dir or self.args.output_dir) / PROJECTOR_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PROJECTOR_FILE
        if self._projector_params() and path.exists():
            load_projector(self.model, path)


def attach_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """A fresh LoRA (adapter "default") on every linear layer of the language model; the
    projector trainable when `cfg.train_projector`; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    from sefe_core.reglora import lora_target_regex

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_regex(model),
        bias="none",
    )
    peft_model = get_peft_model(model, lora)
    if cfg.train_projector:
        _, module = projector_module(peft_model)
        for p in module.parameters():
            p.requires_grad_(True)
    return peft_model


def build_trainer(
    model: torch.nn.Module,
    processor,
    samples: Sequence[dict[str, Any]],
    image_root: str | Path | None,
    output_dir: str | Path,
    cfg: TrainConfig,
    regularizer=None,
    callbacks: Sequence[Any] = (),
):
    """The Trainer for one task (also used directly by tests to compare gradient accumulation)."""
    from transformers import PrinterCallback, TrainingArguments

    from sefe_core.vlm import EncodedDataset, VLMCollator

    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16 and cuda,
        tf32=(cfg.tf32 and cuda) or None,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
        deepspeed=cfg.deepspeed_config(),
    )
    collator = VLMCollator(processor, Path(image_root) if image_root is not None else None, cfg.max_length)
    trainer = SEFETrainer(
        model=model,
        args=args,
        train_dataset=EncodedDataset(list(samples), collator),
        data_collator=collator,
        callbacks=list(callbacks),
        regularizer=regularizer,
        reg_lambda=cfg.reg_lambda,
        projector_lr=cfg.projector_lr if cfg.train_projector else None,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


# --------------------------------------------------------------------------------------------
# One task
# --------------------------------------------------------------------------------------------
def _samples(train_records) -> tuple[list[dict[str, Any]], str]:
    """Training samples ({image, question, answer}) of a task and a digest of them."""
    from data_contracts import INSTRUCTIONS, InstructionRecord

    if isinstance(train_records, str | Path):
        records = [r for r in INSTRUCTIONS.read_records(train_records) if r.split == "train"]
    else:
        records = list(train_records)
        if records and not isinstance(records[0], InstructionRecord):
            raise TypeError("train_records must be InstructionRecords or the path of an instructions Parquet")
        records = [r for r in records if r.split == "train"]
    if not records:
        raise ValueError("no training records (split == 'train') for this task")
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.id, r.image, r.question, r.answer]).encode())
    return [{"image": r.image, "question": r.question, "answer": r.answer} for r in records], h.hexdigest()


def _task_key(cfg: TrainConfig, method: str, base_path: Path, priors: list[Path], data_digest: str) -> str:
    """Hash of what this task learns from: config, method, base model, earlier tasks, data."""
    from sefe_core.hashing import config_hash
    from sefe_core.reglora import check_method, mask_metadata

    base_cfg = base_path / "config.json"
    uses_masks = check_method(method)[0] == "mask"
    prior_keys = []
    for p in priors:
        info = p / TRAIN_JSON
        if not info.exists():
            raise FileNotFoundError(f"earlier task {p} is not finished (no {TRAIN_JSON})")
        prior = json.loads(info.read_text())["config_hash"]
        if uses_masks:  # the penalty reads the earlier masks: which adapter, percent, kind, seed
            meta = mask_metadata(p / MASK_FILE) or {}
            prior = [prior, {k: meta.get(k) for k in ("percent", "kind", "source")}]
        prior_keys.append(prior)
    return config_hash(
        {
            "train": cfg.key_fields(method),
            "method": method,
            "base": [base_path.name, hashlib.sha256(base_cfg.read_bytes()).hexdigest()]
            if base_cfg.exists()
            else base_path.name,
            "priors": prior_keys,
            "data": data_digest,
        }
    )


_CKPT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(ckpt_dir: Path, needs_projector: bool) -> Path | None:
    """The newest checkpoint whose files were all written (a kill mid-save leaves a partial one,
    which Trainer's own get_last_checkpoint would pick); partial ones are removed."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))
    )
    for _, path in reversed(found):
        complete = (path / "trainer_state.json").exists() and (
            not needs_projector or (path / PROJECTOR_FILE).exists()
        )
        if complete:
            return path
        log.warning("removing incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def _read_result(task_dir: Path, key: str) -> TrainResult:
    info = json.loads((task_dir / TRAIN_JSON).read_text())
    proj = task_dir / PROJECTOR_FILE
    return TrainResult(
        task_dir=task_dir,
        adapter_dir=task_dir / ADAPTER_DIR,
        mask_path=task_dir / MASK_FILE,
        projector_path=proj if proj.exists() else None,
        train_json=task_dir / TRAIN_JSON,
        config_hash=key,
        global_step=info["global_step"],
        steps_run=0,
        train_samples=info["train_samples"],
        seconds=0.0,
        final_loss=info["final_loss"],
        resumed_from=None,
        reused=True,
    )


def train_task(
    base_path: str | Path,
    prior_task_dirs: Sequence[str | Path],
    train_records,
    image_root: str | Path | None,
    task_dir: str | Path,
    cfg: TrainConfig,
    method: str,
    *,
    trust_remote_code: bool = False,
    callbacks: Sequence[Any] = (),
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train one task of the sequence with `method`, on the stage after `prior_task_dirs`.
    `progress(done, total)` is called every 5% of the optimizer steps.

    `train_records`: InstructionRecords or an instructions Parquet (rows with split == "train").
    Idempotent: a finished task (train.json with the same config hash) is returned as is with
    `steps_run == 0`; an interrupted one resumes from its last complete Trainer checkpoint.
    """
    from data_contracts import atomic_path, write_json
    from sefe_core.reglora import build_regularizer, check_method

    check_method(method)
    base_path, task_dir = Path(base_path), Path(task_dir)
    priors = [Path(p) for p in prior_task_dirs]
    samples, digest = _samples(train_records)
    key = _task_key(cfg, method, base_path, priors, digest)
    if _trained_with(task_dir / TRAIN_JSON) == key:
        return _read_result(task_dir, key)
    ckpt_dir = task_dir / CHECKPOINTS
    key_file = ckpt_dir / KEY_FILE
    old = _trained_with(task_dir / TRAIN_JSON) or _trained_with(key_file)
    if old is not None and old != key:
        # The config, data or an earlier task changed since this task was trained: its outputs
        # (and checkpoints) belong to the old setup, and this call replaces them.
        log.warning("%s was trained with another setup (%s != %s): training it again", task_dir, old, key)
        (task_dir / TRAIN_JSON).unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(key_file, {"config_hash": key, "method": method})
    resume = last_complete_checkpoint(ckpt_dir, needs_projector=cfg.train_projector)

    from transformers import set_seed

    set_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    model, processor = stage_model(
        base_path,
        priors,
        dtype=torch.bfloat16 if (cfg.bf16 and cuda) else None,
        trust_remote_code=trust_remote_code,
    )
    model = attach_lora(model, cfg)
    regularizer = build_regularizer(model, method, [p / MASK_FILE for p in priors])
    from sefe_core.progress import StepCounter, step_progress

    callbacks = [*callbacks, _FailpointOnSave(), StepCounter()]
    if progress is not None:
        callbacks.append(step_progress(progress))
    trainer = build_trainer(model, processor, samples, image_root, ckpt_dir, cfg, regularizer, callbacks)

    start_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0
    threads = torch.get_num_threads()
    if cfg.cpu_threads and not cuda:
        torch.set_num_threads(cfg.cpu_threads)
    t0 = time.perf_counter()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final_loss = float(losses[-1]) if losses else float(out.training_loss)

    proj_path = task_dir / PROJECTOR_FILE if cfg.train_projector else None
    if trainer.is_world_process_zero():
        # an adapter without train.json is from a finish that was interrupted: replace it
        shutil.rmtree(task_dir / ADAPTER_DIR, ignore_errors=True)
        with atomic_path(task_dir / ADAPTER_DIR) as tmp:
            trainer.model.save_pretrained(str(tmp))
        if proj_path is not None:
            with atomic_path(proj_path) as tmp:
                save_projector(trainer.model, tmp)
        mask_path = extract_task_mask(task_dir, cfg, method)
        info = {
            "config_hash": key,
            "method": method,
            "task": task_dir.name.removeprefix("task-"),
            "global_step": int(trainer.state.global_step),
            "steps_run": int(trainer.state.global_step) - start_step,
            "resumed_from": str(resume) if resume else None,
            "train_samples": len(samples),
            "seconds": seconds,
            "final_loss": final_loss,
            "train_loss": float(out.training_loss),
            "final_reg_penalty": trainer.last_penalty,
            "mask_bytes": mask_path.stat().st_size,
            "priors": [p.name for p in priors],
            "config": cfg.model_dump(mode="json"),
            "torch": torch.__version__,
            "device": "cuda" if cuda else "cpu",
            "cpu_threads": None if cuda else (cfg.cpu_threads or threads),
        }
        write_json(task_dir / TRAIN_JSON, info)
        if not cfg.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # other ranks return once the files exist
    return TrainResult(
        task_dir=task_dir,
        adapter_dir=task_dir / ADAPTER_DIR,
        mask_path=task_dir / MASK_FILE,
        projector_path=proj_path,
        train_json=task_dir / TRAIN_JSON,
        config_hash=key,
        global_step=int(trainer.state.global_step),
        steps_run=int(trainer.state.global_step) - start_step,
        train_samples=len(samples),
        seconds=seconds,
        final_loss=final_loss,
        resumed_from=str(resume) if resume else None,
        reused=False,
    )


def extract_task_mask(task_dir: str | Path, cfg: TrainConfig, method: str) -> Path:
    """This task's own mask from its saved adapter, written atomically to `task_dir/mask.safetensors`:
    top-`mask_percent`% of |B @ A| per module, or a random mask of the same size for
    `reglora-random`, seeded by the config seed and the task. An existing file made from the same
    adapter with the same settings (its metadata says) is kept, so calling it again is free."""
    from data_contracts import sha256_file
    from sefe_core.hashing import stable_seed
    from sefe_core.reglora import ADAPTER_WEIGHTS, check_method, extract_mask, mask_metadata, save_mask

    _, kind = check_method(method)
    task_dir = Path(task_dir)
    path = task_dir / MASK_FILE
    seed = stable_seed(cfg.seed, task_dir.name)
    source = {"adapter_sha256": sha256_file(task_dir / ADAPTER_DIR / ADAPTER_WEIGHTS), "seed": seed}
    meta = mask_metadata(path)
    if meta is not None and (meta["percent"], meta["kind"], meta.get("source")) == (
        cfg.mask_percent,
        kind,
        source,
    ):
        return path
    mask = extract_mask(task_dir / ADAPTER_DIR, cfg.mask_percent, kind, seed=seed)
    return save_mask(mask, path, source=source)


class _FailpointOnSave(TrainerCallback):
    """`train.checkpoint` failpoint (sefe_core/failpoints.py): after a checkpoint is complete."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        failpoint("train.checkpoint")


def _trained_with(info_file: Path) -> str | None:
    """The task key recorded in train.json or a checkpoint folder's key file, if any."""
    return json.loads(info_file.read_text())["config_hash"] if info_file.exists() else None


def run_sequence(
    method: str,
    base_path: str | Path,
    task_files: Mapping[str, str | Path],
    image_root: str | Path | None,
    run_dir: str | Path,
    cfg: TrainConfig,
    *,
    trust_remote_code: bool = False,
    progress: bool = False,
    on_task_end=None,
) -> list[TrainResult]:
    """Train the tasks of `task_files` (ordered: task name -> instructions Parquet) one after
    another with `method`, under `<run_dir>/<method>/task-<name>/`. Finished tasks are reused.
    `progress` shows a rich progress bar per task; `on_task_end(name, result)` after each."""
    from sefe_core.reglora import check_method

    check_method(method)
    method_dir = Path(run_dir) / method
    done: list[Path] = []
    results = []
    for name, data in task_files.items():
        task_dir = method_dir / f"task-{name}"
        callbacks = []
        if progress:
            from sefe_core.progress import RichProgressCallback

            callbacks.append(RichProgressCallback(f"{method} {name}"))
        if cfg.num_processes > 1:  # several GPUs: accelerate launch of the same entry point
            from sefe_core.launch import train_task_launched

            res = train_task_launched(
                base_path, done, data, image_root, task_dir, cfg, method,
                trust_remote_code=trust_remote_code, on_line=print if progress else None,
            )  # fmt: skip
        else:
            res = train_task(
                base_path, done, data, image_root, task_dir, cfg, method,
                trust_remote_code=trust_remote_code, callbacks=callbacks,
            )  # fmt: skip
        results.append(res)
        done.append(task_dir)
        if on_task_end is not None:
            on_task_end(name, res)
    return results


__all__ = [
    "PRESETS",
    "RunTrainConfig",
    "SEFETrainer",
    "TrainConfig",
    "TrainResult",
    "attach_lora",
    "build_trainer",
    "export_merged",
    "extract_task_mask",
    "last_complete_checkpoint",
    "merge_task",
    "run_sequence",
    "stage_model",
    "train_task",
]
