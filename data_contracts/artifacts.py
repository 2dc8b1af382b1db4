"""The artifacts of a SEFE run, one typed record + contract each (docs/design.md §3)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from data_contracts.contract import JSON_OBJECT, RELATIVE_PATH, UNIQUE, Contract, enum

# The five answer styles of ASD plus the grounding-native box style (docs/design.md §1.1).
STYLES = ("yes_no", "mcq", "short", "brief", "detail", "bbox")
ORIGINS = ("original", "asd")
SPLITS = ("train", "val", "test")
# accuracy/format/content: the forgetting split (docs/design.md §1.5); reference: accuracy under the
# reference evaluators' rules (sefe_core.scorers, compat="reference").
MATRICES = ("accuracy", "format", "content", "reference")
METRICS = ("MFT", "MFN", "MAA", "BWT")


@dataclass(frozen=True)
class InstructionRecord:
    """One instruction sample. `image` is relative to the run's image root, or None for a
    text-only question (CoIN's ScienceQA has them; the model then sees no image tokens); `meta` is a JSON
    object holding what scorers and rewriters need beyond the answer (options, the ten TextVQA
    answers, scene metadata, image size)."""

    id: str = field(metadata=UNIQUE)
    task: str
    split: str = field(metadata=enum(*SPLITS))
    image: str | None = field(metadata=RELATIVE_PATH)
    question: str
    answer: str
    style: str = field(metadata=enum(*STYLES))
    origin: str = field(metadata=enum(*ORIGINS))
    source_id: str
    meta: str = field(default="{}", metadata=JSON_OBJECT)

    @property
    def meta_dict(self) -> dict[str, Any]:
        return json.loads(self.meta)


@dataclass(frozen=True)
class RejectRecord:
    """A row that failed a step, with the reason and whatever raw text the step saw."""

    id: str
    task: str
    step: str
    reason: str
    raw_text: str = ""
    # the rewriter's reply was unusable as a reply (transport, HTTP, not JSON, wrong count), not
    # a well-formed answer that failed validation: worth sending again on a rerun
    retryable: bool = False


@dataclass(frozen=True)
class PredictionRecord:
    """One generated answer of the model of `stage` (after task `stage`) on a sample of `task`.

    `score` is the task scorer's value (0/1, or VQA soft accuracy); `format_ok` says whether the
    answer has the task's style, `content_ok` whether it is right once the format is ignored.
    `score_reference` is the score under the reference evaluator's rules (quirks included), kept
    next to the intended one so published numbers can be reproduced from the same file.
    """

    method: str
    stage: int
    task: str
    id: str
    style: str = field(metadata=enum(*STYLES))
    prediction: str
    reference: str
    score: float
    format_ok: bool
    content_ok: bool
    score_reference: float | None = None


@dataclass(frozen=True)
class MetricRecord:
    """One continual-learning metric of one method, on one of the matrices. `value` is None where
    the metric is undefined (BWT with a single task)."""

    method: str
    matrix: str = field(metadata=enum(*MATRICES))
    metric: str = field(metadata=enum(*METRICS))
    value: float | None


INSTRUCTIONS: Contract[InstructionRecord] = Contract("instructions", InstructionRecord)
REJECTS: Contract[RejectRecord] = Contract("rejects", RejectRecord, unique_key=("id", "step"))
PREDICTIONS: Contract[PredictionRecord] = Contract(
    "predictions", PredictionRecord, unique_key=("method", "stage", "task", "id")
)
METRIC_TABLE: Contract[MetricRecord] = Contract(
    "metrics", MetricRecord, unique_key=("method", "matrix", "metric")
)
