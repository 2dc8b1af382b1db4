"""Evaluation of one stage: batched greedy answers on the test split, judged by the task's scorer.

The model of stage k (base + adapters 1..k merged in memory) answers the test questions of every
task seen so far; each answer becomes a `PredictionRecord` with the intended score, the reference
evaluator's score, and the format / content judgement of the forgetting split. Predictions go to
`<run_dir>/<method>/task-<task>/predictions.parquet` (one row per stage, eval task, sample), so
any number of a report can be traced back to its samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from data_contracts import INSTRUCTIONS, PREDICTIONS, InstructionRecord, PredictionRecord
from sefe_core.failpoints import failpoint
from sefe_core.prepare import Benchmark
from sefe_core.registry import TaskSpec, task_spec
from sefe_core.scorers import judge

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, ProcessorMixin

PREDICTIONS_FILE = "predictions.parquet"
STAGE_CHECKPOINT = "stage-checkpoint"  # eval.backend=vllm: the merged stage, while vLLM reads it
VLLM_LOG = "vllm.log"
DEFAULT_BATCH_SIZE = 64


def task_dir(run_dir: str | Path, method: str, task: str) -> Path:
    """`<run_dir>/<method>/task-<task>/`: what training and evaluation write for one task."""
    return Path(run_dir) / method / f"task-{task}"


def predictions_path(run_dir: str | Path, method: str, task: str) -> Path:
    """Where the predictions of the stage after `task` (on every task seen so far) live."""
    return task_dir(run_dir, method, task) / PREDICTIONS_FILE


def select_test_records(records: Sequence[InstructionRecord], spec: TaskSpec) -> list[InstructionRecord]:
    """The original test samples of a task. Scorers judge native answers, so a test record in
    another style is an error rather than a silently wrong score."""
    out = [r for r in records if r.split == "test" and r.origin == "original"]
    if not out:
        raise ValueError(f"task {spec.name}: no original test records to evaluate")
    foreign = [r for r in out if r.task != spec.name or r.style != spec.native_style]
    if foreign:
        r = foreign[0]
        raise ValueError(
            f"task {spec.name}: test record {r.id} is task {r.task!r}, style {r.style!r}; "
            f"expected task {spec.name!r} in its native style {spec.native_style!r}"
        )
    return out


def evaluate_stage(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    records: Sequence[InstructionRecord],
    spec: TaskSpec,
    method: str,
    stage: int,
    image_root: Path | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int | None = None,
) -> list[PredictionRecord]:
    """Answer and judge the test split of one task with the model of `stage` (0 = base model).

    `records` may hold every split of the task; only the original test records are evaluated.
    `max_new_tokens` defaults to the task's budget (`TaskSpec.max_new_tokens`).
    """
    if stage < 0:
        raise ValueError(f"stage must be >= 0 (0 = the base model), got {stage}")
    from sefe_core.vlm import generate_answers

    recs = select_test_records(records, spec)
    answers = generate_answers(
        model,
        processor,
        [{"image": r.image, "question": r.question} for r in recs],
        image_root=image_root,
        max_new_tokens=max_new_tokens or spec.max_new_tokens,
        batch_size=batch_size,
    )
    return judged(recs, answers, spec, method, stage)


def judged(
    recs: Sequence[InstructionRecord], answers: Sequence[str], spec: TaskSpec, method: str, stage: int
) -> list[PredictionRecord]:
    """The prediction records of test records and their answers (from either backend)."""
    out = []
    for r, answer in zip(recs, answers, strict=True):
        j = judge(spec, answer, r.answer, r.meta_dict)
        out.append(
            PredictionRecord(
                method=method,
                stage=stage,
                task=spec.name,
                id=r.id,
                style=r.style,
                prediction=answer,
                reference=r.answer,
                score=j.score,
                format_ok=j.format_ok,
                content_ok=j.content_ok,
                score_reference=j.score_reference,
            )
        )
    return out


def evaluate_seen(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    bench: Benchmark,
    method: str,
    stage: int,
    out_path: str | Path | None = None,
    batch_size: int | Mapping[str, int] = DEFAULT_BATCH_SIZE,
    max_new_tokens: Mapping[str, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[PredictionRecord]:
    """Evaluate the model of `stage` on tasks 1..stage of the benchmark's sequence and, if
    `out_path` is given, write them as one predictions file (atomically). `progress(done, total)`
    is called after each evaluated task.

    `batch_size` and `max_new_tokens` may be set per task name (a mapping); tasks not in the
    mapping use the default batch size and their `TaskSpec.max_new_tokens`.
    """
    if not 1 <= stage <= len(bench.tasks):
        raise ValueError(f"stage must be in 1..{len(bench.tasks)} for this benchmark, got {stage}")
    preds: list[PredictionRecord] = []
    for done, task in enumerate(bench.tasks[:stage], start=1):
        spec = task_spec(bench.name, task)
        bs = batch_size.get(task, DEFAULT_BATCH_SIZE) if isinstance(batch_size, Mapping) else batch_size
        mnt = (max_new_tokens or {}).get(task)
        records = INSTRUCTIONS.read_records(bench.task_file(task))
        preds += evaluate_stage(model, processor, records, spec, method, stage, bench.image_root, bs, mnt)
        failpoint("eval.task")
        if progress is not None:
            progress(done, stage)
    if out_path is not None:
        write_predictions(preds, out_path)
    return preds


def evaluate_seen_vllm(
    model_dir: str | Path,
    bench: Benchmark,
    method: str,
    stage: int,
    out_path: str | Path | None = None,
    max_new_tokens: Mapping[str, int] | None = None,
    **vllm: Any,
) -> list[PredictionRecord]:
    """`evaluate_seen` with vLLM answering (`vllm_backend`): the stage as a checkpoint directory,
    every seen task's test questions in one engine run. `vllm`: `vllm_answers`' options."""
    from sefe_core.vllm_backend import vllm_answers

    if not 1 <= stage <= len(bench.tasks):
        raise ValueError(f"stage must be in 1..{len(bench.tasks)} for this benchmark, got {stage}")
    tests: list[tuple[TaskSpec, list[InstructionRecord]]] = []
    for task in bench.tasks[:stage]:
        spec = task_spec(bench.name, task)
        tests.append((spec, select_test_records(INSTRUCTIONS.read_records(bench.task_file(task)), spec)))
    budget = max_new_tokens or {}
    batches = [
        (
            [{"image": r.image, "question": r.question} for r in recs],
            budget.get(spec.name, spec.max_new_tokens),
        )
        for spec, recs in tests
    ]
    answers = vllm_answers(model_dir, batches, bench.image_root, **vllm)
    preds = []
    for (spec, recs), task_answers in zip(tests, answers, strict=True):
        preds += judged(recs, task_answers, spec, method, stage)
    if out_path is not None:
        write_predictions(preds, out_path)
    return preds


def evaluate_stage_dir(
    base_path: str | Path,
    task_dirs: Sequence[str | Path],
    bench_dir: str | Path,
    method: str,
    out_path: str | Path,
    *,
    batch_size: int | Mapping[str, int] = DEFAULT_BATCH_SIZE,
    max_new_tokens: Mapping[str, int] | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
    backend: str = "hf",
    vllm_python: str | None = None,
    vllm_engine_args: dict[str, Any] | None = None,
) -> dict[str, float | int]:
    """Stage k = len(task_dirs): rebuild it (base + adapters 1..k), answer tasks 1..k, write the
    predictions file. Paths in, numbers out, so it can run in a worker process.

    backend "vllm": the stage is written as a merged checkpoint next to `out_path` (removed
    afterwards; its vLLM log stays), and vLLM answers from it."""
    import shutil

    import torch

    from sefe_core.prepare import load_benchmark
    from sefe_core.stage import export_merged, stage_model

    bench = load_benchmark(bench_dir)
    stage = len(task_dirs)
    if backend == "vllm":
        ckpt = Path(out_path).parent / STAGE_CHECKPOINT
        export_merged(
            base_path, task_dirs, ckpt, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
        try:
            preds = evaluate_seen_vllm(
                ckpt, bench, method, stage, out_path, max_new_tokens, python=vllm_python, dtype=dtype,
                engine_args=vllm_engine_args, log_path=Path(out_path).parent / VLLM_LOG,
            )  # fmt: skip
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)
        if progress is not None:
            progress(stage, stage)
    elif backend == "hf":
        model, processor = stage_model(
            base_path, task_dirs, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
        preds = evaluate_seen(
            model, processor, bench, method, stage, out_path=out_path, batch_size=batch_size,
            max_new_tokens=max_new_tokens, progress=progress,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown eval.backend {backend!r}; known: hf, vllm")
    return {"predictions": len(preds), "mean_score": sum(p.score for p in preds) / max(len(preds), 1)}


def write_predictions(predictions: Sequence[PredictionRecord], path: str | Path) -> Path:
    """Validate against the `predictions` contract and write atomically."""
    PREDICTIONS.write(predictions, path)
    return Path(path)


def read_predictions(path: str | Path) -> pd.DataFrame:
    return PREDICTIONS.read(path).to_pandas()


def method_predictions(run_dir: str | Path, method: str) -> pd.DataFrame:
    """Every prediction of one method: the union of its `task-*/predictions.parquet` files."""
    files = sorted((Path(run_dir) / method).glob(f"task-*/{PREDICTIONS_FILE}"))
    if not files:
        raise FileNotFoundError(f"{Path(run_dir) / method}: no task-*/{PREDICTIONS_FILE} files")
    df = pd.concat([read_predictions(f) for f in files], ignore_index=True)
    dup = df.duplicated(["method", "stage", "task", "id"])
    if dup.any():
        row = df[dup].iloc[0]
        raise ValueError(
            f"{Path(run_dir) / method}: stage {row['stage']}, task {row['task']}, sample {row['id']} "
            "appears in more than one predictions file"
        )
    return df


def run_methods(run_dir: str | Path) -> list[str]:
    """Methods under a run directory that have predictions (directories with task-*/predictions)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(f"task-*/{PREDICTIONS_FILE}")))
