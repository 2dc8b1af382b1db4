"""The `rules` ASD backend: distractors and explanations without a model, from what a record
already holds (its options, the other class names or OCR token, perturbed boxes, MiniCoIN scene
metadata through its task kind's facts)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sefe_core.hashing import stable_seed
from sefe_core.kinds import get_kind
from sefe_core.rewriter import (
    EXPLANATION_TARGET,
    EXPLANATION_WORDS,
    Material,
    Outcome,
    Rejection,
    RewriteRequest,
    _norm,
)
from sefe_core.scenes import (
    AUTHORS,
    COLORS,
    GENRES,
    QUADRANTS,
    SHAPES,
    SIGN_WORDS,
    format_box,
    listing,
    scene_facts,
)
from sefe_core.styles import parse_box

# Word groups of MiniCoIN answers: a distractor comes from the group of the correct answer.
_GROUPS: tuple[tuple[str, ...], ...] = (
    tuple(COLORS),
    SHAPES,
    QUADRANTS,
    SIGN_WORDS,
    tuple(GENRES.values()),
    tuple(AUTHORS.values()),
    ("left", "right", "above", "below"),
    ("1", "2", "3", "4", "5", "6"),
    ("yes", "no"),
)
_FILLERS = (
    "The answer rests only on what can be seen in the picture and read in the question.",
    "Nothing else in the picture points to a different answer.",
    "A second look at the picture confirms this reading.",
    "The other possible answers do not fit what the picture shows.",
)


def _group_of(answer: str, question: str) -> tuple[str, ...] | None:
    a = answer.lower()
    for g in _GROUPS:
        if a in g:
            return g
    if a == "unanswerable":  # VizWiz mirror: the question says what a readable photo would give
        return tuple(COLORS) if "color" in question.lower() else SHAPES
    return None


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class RulesRewriter:
    """Distractors and explanations without a model, from the record's own data and metadata.

    Explanations need scene metadata (MiniCoIN) or a `solution` / `explanation` text in `meta`
    (ScienceQA has one); a record without either is rejected with a reason naming the openai
    backend, never given a made-up explanation.
    """

    name = "rules"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}

    def rewrite(self, requests: Sequence[RewriteRequest], image_root: Path) -> list[Outcome]:
        return [self._one(r) for r in requests]

    def _one(self, req: RewriteRequest) -> Outcome:
        rng = np.random.default_rng(stable_seed("asd-rules", self.seed, req.id))
        meta = req.record.meta_dict
        distractors: list[str] = []
        if req.n_distractors:
            pool = self._candidates(req, meta, rng)
            if len(pool) < req.n_distractors:
                return Rejection(
                    f"rules: only {len(pool)} distractor candidate(s) for answer {req.correct!r}, "
                    f"{req.n_distractors} needed",
                    json.dumps({"candidates": pool}),
                )
            distractors = pool[: req.n_distractors]
        explanation = ""
        if req.explanation:
            sentences = self._facts(req, meta)
            if not sentences:
                return Rejection(
                    f"rules: record has no scene metadata or solution text to explain task "
                    f"{req.task_key!r} from; use the openai backend"
                )
            explanation = self._compose(req.style, sentences, meta, scene=not meta.get("unanswerable"))
        raw = json.dumps({"distractors": distractors, "explanation": explanation})
        return Material(tuple(distractors), explanation, raw)

    # -- distractors ------------------------------------------------------------------------
    def _candidates(self, req: RewriteRequest, meta: dict[str, Any], rng: np.random.Generator) -> list[str]:
        correct = req.correct.strip()
        if parse_box(correct) is not None:
            return self._boxes(correct, meta, rng)
        own: list[str] = []  # the record's own alternatives make the hardest distractors
        for key in ("options", "ocr_tokens", "classes"):
            own += [str(x) for x in meta.get(key, [])]
        for o in meta.get("objects", []):
            own += [o["shape"], o["color"]]
        group = _group_of(correct, req.question)
        if group is None and not meta.get("options"):
            return []
        if group is None:  # real ScienceQA: options are all there is
            first, rest = [x for x in own if x in meta["options"]], []
        else:
            first = [x for x in own if x in group]
            rest = list(group)
            if "unanswerable" in req.question.lower() and correct.lower() != "unanswerable":
                rest.append("unanswerable")
        out: list[str] = []
        seen = {_norm(correct)}
        for part in (first, rest):
            for i in rng.permutation(len(part)):
                x = part[int(i)]
                if _norm(x) not in seen:
                    seen.add(_norm(x))
                    out.append(x)
        return out

    def _boxes(self, correct: str, meta: dict[str, Any], rng: np.random.Generator) -> list[str]:
        """Other objects' boxes first, then the true box moved until it overlaps little (IoU < 0.3)."""
        true = parse_box(correct)
        assert true is not None
        out: list[list[float]] = []
        for o in meta.get("objects", []):
            b = [round(v, 2) for v in o["box"]]
            if _iou(b, true) < 0.3 and b not in out:
                out.append(b)
        w, h = true[2] - true[0], true[3] - true[1]
        for _ in range(200):
            if len(out) >= 6:
                break
            x1 = float(rng.uniform(0, 1 - w))
            y1 = float(rng.uniform(0, 1 - h))
            b = [round(x1, 2), round(y1, 2), round(x1 + w, 2), round(y1 + h, 2)]
            if b[2] <= 1 and b[3] <= 1 and _iou(b, true) < 0.3 and all(_iou(b, c) < 0.7 for c in out):
                out.append(b)
        return [format_box(b) for b in out]

    # -- explanations -----------------------------------------------------------------------
    def _facts(self, req: RewriteRequest, meta: dict[str, Any]) -> list[str]:
        """Sentences that say why the answer is right, most specific first: the record's own
        solution text, else its task kind's facts, else what its scene shows."""
        for key in ("solution", "explanation"):
            if isinstance(meta.get(key), str) and meta[key].strip():
                return [s.strip() + "." for s in meta[key].split(".") if s.strip()]
        question = req.question.split("\n")[0]
        kind = get_kind(req.task_key)
        facts = kind.facts(req.correct, question, meta) if kind.facts is not None else None
        return scene_facts(req.correct, question, meta) if facts is None else facts

    def _compose(self, style: str, facts: list[str], meta: dict[str, Any], scene: bool) -> str:
        """Sentences up to the style's target length: facts first, then the scene (unless the
        photo is unreadable: naming its objects would contradict the answer), then fillers."""
        lo, hi = EXPLANATION_WORDS[style]
        target = EXPLANATION_TARGET[style]
        extra: list[str] = []
        if style == "detail":
            objs = meta.get("objects", [])
            if objs and scene:
                extra.append(f"The whole picture shows {listing(objs)}.")
            if "image_size" in meta:
                extra.append(f"The picture is {meta['image_size'][0]} pixels wide and tall.")
            extra += list(_FILLERS)
        out: list[str] = []
        for s in facts + extra:
            n = len(" ".join(out).split())
            if n >= target or n + len(s.split()) > hi:
                if n >= lo:
                    break
                continue
            out.append(s)
        return " ".join(out)
