"""Task kinds as units: one folder per CoIN task kind, holding everything the pipeline needs to
know about it, found by name in `KINDS`:

- its spec: the CoIN dataset it mirrors, its native answer style, its generation budget;
- its scorers: the intended rule, the reference evaluator's rule (`compat="reference"`), and the
  lenient content check of the forgetting split;
- its MiniCoIN generator (`generate(rng) -> (image, question, answer, meta)`), and optionally
  another phrasing for MiniCoIN's later rounds (`generate_round(rng, round)`);
- its rules-rewriter facts (why an answer is right, from the record's meta), if it has its own;
- its ASD prompt for a served rewriter (`prompt.txt` beside its module);
- how CoIN's files give its ground truth and record metadata (`coin`), if not the default.

A new kind = one new folder here and its import below. Shared helpers live in `scorers.py`
(answer normalisation, exact match, IoU) and `scenes.py` (drawing and describing MiniCoIN
pictures); neither imports this package, so a unit may import them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ScoreFn = Callable[[str, str, Mapping[str, Any]], float]
ContentFn = Callable[[str, str, Mapping[str, Any]], bool]
FactsFn = Callable[[str, str, dict[str, Any]], "list[str] | None"]


@dataclass(frozen=True)
class CoinAdapter:
    """What differs from a plain CoIN record for this kind (sefe_core/coin.py applies it).

    `truth_field`: the `benchmark.coin` field naming the kind's ground-truth file; `table(data)`
    turns that file's JSON into {question id: entry}; `truth(rec, qid, question, table)` gives the
    test record's `Truth` (or a reason there is none, or None for the default: the record's own
    `answer`); `train_meta(question, answer, coin_id, table)` extra metadata of a train record;
    `test_question(question)` the question as the reference evaluation asks it."""

    truth_field: str | None = None
    table: Callable[[Any], dict[str, Any]] | None = None
    truth: Callable[[dict[str, Any], str, str, dict[str, Any] | None], Any] | None = None
    train_meta: Callable[[str, str, str, dict[str, Any] | None], dict[str, Any]] | None = None
    test_question: Callable[[str], str] | None = None


@dataclass(frozen=True)
class TaskKind:
    key: str  # "scienceqa": the scorer name in task specs and prediction files
    coin_name: str  # the CoIN dataset folder it mirrors
    native_style: str
    max_new_tokens: int  # generation budget for its native answers
    score: ScoreFn
    score_reference: ScoreFn
    content: ContentFn
    generate: Callable[[Any], Any]  # MiniCoIN: rng -> (image, question, answer, meta)
    # MiniCoIN's later rounds (benchmark.minicoin.rounds): (rng, round) -> a sample of the same
    # format and scorer, asked another way; None: `generate` (a later round differs by its seeds)
    generate_round: Callable[[Any, int], Any] | None = None
    facts: FactsFn | None = None  # rules rewriter: (answer, question, meta) -> sentences, or None
    coin: CoinAdapter = field(default_factory=CoinAdapter)

    @property
    def prompt_path(self) -> Path:
        return Path(__file__).parent / self.key / "prompt.txt"


KINDS: dict[str, TaskKind] = {}


def register(kind: TaskKind) -> TaskKind:
    if kind.key in KINDS:
        raise ValueError(f"task kind {kind.key!r} is registered twice")
    KINDS[kind.key] = kind
    return kind


def get_kind(key: str) -> TaskKind:
    if key not in KINDS:
        raise KeyError(f"unknown task kind {key!r}; known: {list(KINDS)}")
    return KINDS[key]


# The registry entries, in CoIN's order (it is the order of the task sequence).
from sefe_core.kinds import scienceqa  # noqa: E402, F401, I001
from sefe_core.kinds import textvqa  # noqa: E402, F401
from sefe_core.kinds import imagenet  # noqa: E402, F401
from sefe_core.kinds import gqa  # noqa: E402, F401
from sefe_core.kinds import vizwiz  # noqa: E402, F401
from sefe_core.kinds import grounding  # noqa: E402, F401
from sefe_core.kinds import vqav2  # noqa: E402, F401
from sefe_core.kinds import ocrvqa  # noqa: E402, F401
