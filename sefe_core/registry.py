"""Task registry: each task of a continual sequence, with its kind (sefe_core/kinds/: native
answer style, scorers, generator, CoIN adapter).

MiniCoIN registers its eight tasks here; the real CoIN loaders register theirs under the same
scorer names, so evaluation code never branches on which benchmark it is looking at.

MiniCoIN can repeat its sequence (`benchmark.minicoin.rounds`): round r numbers its tasks on,
`09-scienceqa` .. `16-ocrvqa` in round 2, each a task of its own (its own seeds; some kinds ask
their question another way, `TaskKind.generate_round`). `task_spec` knows every round's names, so
a lookup by name never needs the config; `benchmark_tasks(name, rounds)` gives the sequence.
"""

from __future__ import annotations

import functools
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
    generation budget for its native answers, `round` which pass over the kinds it belongs to
    (MiniCoIN's `rounds`; 1 everywhere else).
    """

    name: str
    coin_name: str
    native_style: str
    scorer: str
    max_new_tokens: int
    round: int = 1

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
    _repeated.cache_clear()


# Benchmarks whose sequence can be run several times over (MiniCoIN: generated, so a later
# round is fresh data; the real CoIN has one set of files per task).
REPEATABLE = frozenset({"minicoin"})
# Task numbers stay two digits (so that names sort in sequence order): 12 rounds of 8 at most.
MAX_ROUNDS = 12


def check_rounds(benchmark: str, rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be an integer from 1 to {MAX_ROUNDS}, got {rounds!r}")
    if rounds > 1 and benchmark not in REPEATABLE:
        raise ValueError(
            f"benchmark {benchmark!r} has one round only (rounds={rounds}); repeatable: {sorted(REPEATABLE)}"
        )


def repeat_sequence(tasks: tuple[TaskSpec, ...], rounds: int) -> tuple[TaskSpec, ...]:
    """`tasks` and then again, `rounds` times in all: round r's task i is numbered
    (r-1)*len(tasks)+i and keeps the kind, style and budget of round 1's task i."""
    out = list(tasks)
    for r in range(2, rounds + 1):
        for i, t in enumerate(tasks, start=1):
            n = (r - 1) * len(tasks) + i
            out.append(
                TaskSpec(f"{n:02d}-{t.scorer}", t.coin_name, t.native_style, t.scorer, t.max_new_tokens, r)
            )
    return tuple(out)


def benchmark_tasks(name: str, rounds: int = 1) -> tuple[TaskSpec, ...]:
    """The benchmark's task sequence; `rounds` > 1 (MiniCoIN only) repeats it."""
    if name not in _BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; registered: {sorted(_BENCHMARKS)}")
    check_rounds(name, rounds)
    return _BENCHMARKS[name] if rounds == 1 else _repeated(name, rounds)


@functools.lru_cache(maxsize=64)
def _repeated(name: str, rounds: int) -> tuple[TaskSpec, ...]:
    return repeat_sequence(_BENCHMARKS[name], rounds)


def task_spec(benchmark: str, task: str) -> TaskSpec:
    """The spec of a task by name, in whichever round it is (`09-scienceqa`: round 2)."""
    known = benchmark_tasks(benchmark, MAX_ROUNDS if benchmark in REPEATABLE else 1)
    for t in known:
        if t.name == task:
            return t
    first = [t.name for t in benchmark_tasks(benchmark)]
    more = f" (and their later rounds, up to {known[-1].name})" if benchmark in REPEATABLE else ""
    raise KeyError(f"benchmark {benchmark!r} has no task {task!r}; tasks: {first}{more}")


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
