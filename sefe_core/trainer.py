"""The Trainer of one task: transformers' Trainer plus the continual method's penalty, a
projector learning rate, the projector in every checkpoint, and length-grouped batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from sefe_core.failpoints import failpoint
from sefe_core.stage import PROJECTOR_FILE, load_projector, save_projector
from sefe_core.train_config import TrainConfig

# `train.report_to: tensorboard`: event files in `<task dir>/tensorboard/` (kept: checkpoints are not)
TENSORBOARD_DIR = "tensorboard"


class _GroupedByLength(LengthGroupedSampler):
    """Length-grouped batches over mega-batches of 8 batches. Trainer's sampler sizes mega-batches
    by the dataset (fewer than 4 batches' worth per mega-batch on a small task: no grouping at
    all), which left a MiniCoIN ASD task at 2.4x the tokens of its original records."""

    def __iter__(self):
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, 8, generator=self.generator))


class SEFETrainer(Trainer):
    """Trainer + the continual method's penalty, a projector learning rate, and the projector in checkpoints.

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


def build_trainer(
    model: torch.nn.Module,
    processor,
    samples: Sequence[dict[str, Any]] | torch.utils.data.Dataset,
    image_root: str | Path | None,
    output_dir: str | Path,
    cfg: TrainConfig,
    regularizer=None,
    callbacks: Sequence[Any] = (),
    reg_lambda: float | None = None,
):
    """The Trainer for one task (also used directly by tests to compare gradient accumulation).
    `samples`: sample dicts ({image, question, answer}) or an encoded Dataset of them.
    `regularizer()` is the method's penalty, weighted by `reg_lambda` (default `cfg.reg_lambda`)."""
    from transformers import PrinterCallback, TrainingArguments

    from sefe_core.vlm import EncodedDataset, VLMCollator

    cuda = torch.cuda.is_available()
    report_to = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to)
    report_to = [] if report_to in (["none"], []) else report_to
    callbacks = list(callbacks)
    if "tensorboard" in report_to:  # beside the checkpoints, not inside them: they are deleted at the end
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(str(Path(output_dir).parent / TENSORBOARD_DIR))))
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
        report_to=[r for r in report_to if r != "tensorboard"],
        disable_tqdm=True,
        use_cpu=not cuda,
        deepspeed=cfg.deepspeed_config(),
    )
    collator = VLMCollator(processor, Path(image_root) if image_root is not None else None, cfg.max_length)
    trainer = SEFETrainer(
        model=model,
        args=args,
        # a Dataset (sefe_core.train_data: memory-mapped) as is; sample dicts encoded in memory
        train_dataset=samples
        if isinstance(samples, torch.utils.data.Dataset)
        else EncodedDataset(list(samples), collator),
        data_collator=collator,
        callbacks=callbacks,
        regularizer=regularizer,
        reg_lambda=cfg.reg_lambda if reg_lambda is None else reg_lambda,
        projector_lr=cfg.projector_lr if cfg.train_projector else None,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


class NonFiniteTraining(FloatingPointError):
    """The loss or the weights of a task became inf/nan: nothing of it is saved as trained."""


class StopOnNonFinite(TrainerCallback):
    """Fail the task at the first non-finite logged loss (a diverged learning rate), naming the
    step and the settings to look at, instead of saving NaN adapters as a finished task."""

    def __init__(self, task: str):
        self.task = task

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteTraining(
                f"{self.task}: the training loss is {loss} at step {state.global_step} (learning_rate "
                f"{args.learning_rate}, max_grad_norm {args.max_grad_norm}): training diverged; "
                "nothing was saved as trained"
            )


def check_finite(model: torch.nn.Module, task: str) -> None:
    """Every trainable weight finite, before the task's adapter is saved as trained."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteTraining(
            f"{task}: {len(bad)} trained weights are not finite (e.g. {bad[0]}); nothing was saved"
        )


class FailpointOnSave(TrainerCallback):
    """`train.checkpoint` failpoint (sefe_core/failpoints.py): after a checkpoint is complete."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        failpoint("train.checkpoint")
