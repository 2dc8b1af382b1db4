"""ImageNet: name the object's class."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sefe_core.kinds import TaskKind, register
from sefe_core.scenes import COLORS, SHAPES, Obj, Sample, object_answered, picture_size, render, scene_facts
from sefe_core.scorers import contains_answer
from sefe_core.styles import SHORT_SUFFIX


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def _words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def imagenet(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return 0.0
    return float(f" {r} " in f" {p} " or f" {p} " in f" {r} ")


def imagenet_reference(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    """eval_imagenet.py's rule: either text inside the other, raw and case-sensitive."""
    # jinpeng0528/SEFE llava/eval/CoIN/eval_imagenet.py:25-28 (the test file's `answer` against
    # the text; an empty text is inside any answer)
    return float(reference in prediction or prediction in reference)


def imagenet_content(prediction: str, reference: str, meta: Mapping[str, Any]) -> bool:
    return imagenet(prediction, reference, meta) > 0 or contains_answer(prediction, reference)


# --------------------------------------------------------------------------------------------
# MiniCoIN
# --------------------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> Sample:
    size = picture_size(rng)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    side = int(size * rng.uniform(0.5, 0.8))
    x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    obj = Obj(shape, color, "center", (x1, y1, x1 + side, y1 + side))
    q = f"What is the object in the image?\n{SHORT_SUFFIX}"
    meta = {"objects": [obj.as_meta(size)], "classes": list(SHAPES), "image_size": [size, size]}
    return render([obj], size), q, shape, meta


def facts(answer: str, question: str, meta: dict[str, Any]) -> list[str] | None:
    """The scene's facts, and the two other classes the outline is not."""
    out = scene_facts(answer, question, meta)
    objs = meta.get("objects", [])
    if objs and not question.startswith("How many") and answer not in ("yes", "no"):
        t = object_answered(answer, objs)
        others = [c for c in meta.get("classes", []) if c != t["shape"]][:2]
        if len(others) == 2:
            out.append(f"Its outline is that of a {t['shape']}, not a {others[0]} or a {others[1]}.")
    return out


KIND = register(
    TaskKind(
        key="imagenet",
        coin_name="ImageNet",
        native_style="short",
        max_new_tokens=6,
        score=imagenet,
        score_reference=imagenet_reference,
        content=imagenet_content,
        generate=generate,
        facts=facts,
    )
)
