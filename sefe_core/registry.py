"""Task registry: each task of a continual sequence, with its native answer style and scorer.

MiniCoIN registers its eight tasks here; the real CoIN loaders register theirs under the same
scorer names, so evaluation code never branches on which benchmark it is looking at.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_contracts import STYLES

# CoIN's response-format instructions (LLaVA-1.5 evaluation prompts); MiniCoIN uses the same.
SHORT_SUFFIX = "Answer the question using a single word or phrase."
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
UNANSWERABLE_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'."
GROUNDING_PREFIX = "Please provide the bounding box coordinate of the region this sentence describes:"

# Scorer names implemented by the evaluation module (one per CoIN evaluator).
SCORERS = ("scienceqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa")


@dataclass(frozen=True)
class TaskSpec:
    """What the pipeline needs to know about one task of a sequence.

    `name` is the run-directory name (`03-imagenet`), `coin_name` the CoIN dataset it mirrors,
    `max_new_tokens` the generation budget for its native answers.
    """

    name: str
    coin_name: str
    native_style: str
    scorer: str
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.native_style not in STYLES:
            raise ValueError(f"task {self.name}: unknown native style {self.native_style!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"task {self.name}: unknown scorer {self.scorer!r}; known: {SCORERS}")


_BENCHMARKS: dict[str, tuple[TaskSpec, ...]] = {}


def register_benchmark(name: str, tasks: tuple[TaskSpec, ...]) -> None:
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark {name}: duplicate task names {names}")
    _BENCHMARKS[name] = tasks


def benchmark_tasks(name: str) -> tuple[TaskSpec, ...]:
    if name not in _BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; registered: {sorted(_BENCHMARKS)}")
    return _BENCHMARKS[name]


def task_spec(benchmark: str, task: str) -> TaskSpec:
    for t in benchmark_tasks(benchmark):
        if t.name == task:
            return t
    raise KeyError(
        f"benchmark {benchmark!r} has no task {task!r}; tasks: {[t.name for t in benchmark_tasks(benchmark)]}"
    )


def _coin_sequence() -> tuple[TaskSpec, ...]:
    """CoIN's order and evaluators (docs/design.md §1); MiniCoIN mirrors it one to one."""
    rows = [
        ("scienceqa", "ScienceQA", "mcq", 4),
        ("textvqa", "TextVQA", "short", 6),
        ("imagenet", "ImageNet", "short", 6),
        ("gqa", "GQA", "short", 6),
        ("vizwiz", "VizWiz", "short", 6),
        ("grounding", "Grounding", "bbox", 24),
        ("vqav2", "VQAv2", "short", 6),
        ("ocrvqa", "OCRVQA", "short", 8),
    ]
    return tuple(
        TaskSpec(name=f"{i:02d}-{key}", coin_name=coin, native_style=style, scorer=key, max_new_tokens=mnt)
        for i, (key, coin, style, mnt) in enumerate(rows, start=1)
    )


COIN_TASKS = _coin_sequence()
register_benchmark("minicoin", COIN_TASKS)
# The real CoIN (sefe_core.coin): the same eight specs, CoIN folders mapped through `coin_name`.
register_benchmark("coin", COIN_TASKS)
