"""Progress on long work: one rich progress bar per Trainer run, with the running loss.

Replaces the Trainer's tqdm bar and its raw log-dict prints, which interleave badly with the
rest of the terminal output.
"""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

BAR_COLUMNS = (
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TextColumn("loss {task.fields[loss]}"),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
)


class RichProgressCallback(TrainerCallback):
    def __init__(self, description: str):
        self.description = description
        self.progress: Progress | None = None
        self.task = None
        self.loss = float("nan")

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw
    ) -> None:
        self.progress = Progress(*BAR_COLUMNS, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(
            self.description, total=state.max_steps, completed=state.global_step, loss="-"
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw
    ) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw
    ) -> None:
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{float(logs['loss']):.3f}")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw
    ) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def quiet_libraries() -> None:
    """Keep a pipeline run's terminal readable: no per-load "Loading weights" bars from
    transformers (one per stage model), no deprecation notice peft triggers on every task."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


class _StepProgress(TrainerCallback):
    def __init__(self, fn, every: float = 5.0):
        self.fn, self.every, self.shown = fn, every, -1e9

    def on_step_end(self, args, state, control, **kw) -> None:  # noqa: ANN001
        pct = 100.0 * state.global_step / max(state.max_steps, 1)
        if pct - self.shown >= self.every or state.global_step == state.max_steps:
            self.fn(state.global_step, state.max_steps)
            self.shown = pct


def step_progress(fn, every: float = 5.0) -> TrainerCallback:
    """A Trainer callback calling `fn(done, total)` every `every` percent of the optimizer steps
    (a Prefect progress artifact is an API call: not every step)."""
    return _StepProgress(fn, every)


class StepCounter(TrainerCallback):
    """Counts optimizer steps actually run (a resumed run counts only the steps it did)."""

    def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        from sefe_core import counters

        counters.add("train_steps")
