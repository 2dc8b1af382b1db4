"""Task registry: each task of a continual sequence, with its kind (sefe_core/kinds/: native
answer style, scorers, generator, CoIN adapter).

MiniCoIN registers its eight tasks here; the real CoIN loaders register theirs under the same
scorer names, so evaluation code never branches on which benchmark it is looking at.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_contracts import STYLES
from sefe_core.kinds import KINDS

# The task kinds (sefe_core/kinds/), in CoIN's order: a task spec's `scorer` names one.
SCORERS = tuple(KINDS)


@dataclass(frozen=True)
class TaskSpec:
    """What the pipeline needs to know about one task of a sequence.

    `name` is the run-directory name (`03-imagenet`), `scorer` the key of its task kind
    (`get_kind(spec.scorer)`), `coin_name` the CoIN dataset it mirrors, `max_new_tokens` the
    generation budget for its native answers.
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
    """CoIN's order and evaluators (docs/design.md §1), one task per kind; MiniCoIN mirrors it."""
    return tuple(
        TaskSpec(f"{i:02d}-{k.key}", k.coin_name, k.native_style, k.key, k.max_new_tokens)
        for i, k in enumerate(KINDS.values(), start=1)
    )


COIN_TASKS = _coin_sequence()
register_benchmark("minicoin", COIN_TASKS)
# The real CoIN (sefe_core.coin): the same eight specs, CoIN folders mapped through `coin_name`.
register_benchmark("coin", COIN_TASKS)
