"""Grounding (RefCOCO-style): the bounding box of the described object."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sefe_core.kinds import CoinAdapter, TaskKind, register
from sefe_core.scenes import Sample, box_words, describe, format_box, picture_size, random_scene, render
from sefe_core.scorers import IOU_THRESHOLD, iou
from sefe_core.styles import GROUNDING_PREFIX, parse_box

# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_FOUR = re.compile(r"^\[?\s*" + r"\s*,\s*".join([f"({_NUMBER})"] * 4) + r"\s*\]?$")
_BRACKETED_FOUR = re.compile(r"\[\s*" + r"\s*,\s*".join([f"({_NUMBER})"] * 4) + r"\s*\]")
_ANY_NUMBER = re.compile(r"(?<![\w.])" + _NUMBER + r"(?!\w)")  # standalone: not the 1 of "x1"


def _truth_box(reference: str, meta: Mapping[str, Any]) -> list[float]:
    """The ground-truth box, normalised in the square-padded frame (LLaVA's expand2square)."""
    if "box" in meta:
        return [float(v) for v in meta["box"]]
    m = _FOUR.match(reference.strip())
    if not m:
        raise ValueError(f"grounding: meta has no 'box' and the reference {reference!r} is not a box")
    return [float(g) for g in m.groups()]


def grounding_box(prediction: str) -> list[float] | None:
    """Four numbers, optionally in brackets, and nothing else: the intended parse."""
    m = _FOUR.match(prediction.strip())
    return [float(g) for g in m.groups()] if m else None


def grounding(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    box = grounding_box(prediction)
    return float(box is not None and iou(box, _truth_box(reference, meta)) > IOU_THRESHOLD)


def _iou_reference(a: list[float], b: list[float]) -> float:
    """IoU as the reference computes it, term by term in its order (the rounding decides answers
    at IoU 0.5): no check for empty or inverted boxes, 0 where the union is not positive."""
    # jinpeng0528/SEFE llava/eval/CoIN/eval_grounding.py:46-52
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_reference(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    """eval_grounding.py's rule for one answer: brackets removed, then the first and last
    characters cut off, and the boxes scaled by the image's longer side before the IoU."""
    # jinpeng0528/SEFE llava/eval/CoIN/eval_grounding.py:70-77: brackets removed, the first and
    # last characters cut, the rest split at commas and read by float(); a text that does not
    # read, or not as four numbers, is skipped (wrong, still counted)
    text = prediction.replace("[", "").replace("]", "")
    try:
        box = [float(x) for x in text[1:-1].split(",")]
    except ValueError:
        return 0.0
    if len(box) != 4:
        return 0.0
    # :65-67: the truth is the record's answer_bbox read in full (meta's box is that reading,
    # sefe_core/coin.py coin_box)
    truth = _truth_box(reference, meta)
    # :79-81: both boxes times max(size). The IoU does not depend on the scale, its rounding does.
    # Without an image size (the reference would fail on its `size`) the boxes stay as written.
    size = meta.get("image_size")
    if size:
        side = max(size)
        box, truth = [v * side for v in box], [v * side for v in truth]
    # :83-84: right when the IoU exceeds 0.5
    return float(_iou_reference(box, truth) > IOU_THRESHOLD)


def grounding_content(prediction: str, reference: str, meta: Mapping[str, Any]) -> bool:
    """A box anywhere in the answer: the first bracketed four numbers, else the first four."""
    m = _BRACKETED_FOUR.search(prediction)
    if m:
        box = [float(g) for g in m.groups()]
    else:
        nums = _ANY_NUMBER.findall(prediction)
        if len(nums) < 4:
            return False
        box = [float(v) for v in nums[:4]]
    return iou(box, _truth_box(reference, meta)) > IOU_THRESHOLD


# --------------------------------------------------------------------------------------------
# MiniCoIN
# --------------------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> Sample:
    size = picture_size(rng)
    objs = random_scene(rng, int(rng.integers(2, 4)), size)
    target = objs[int(rng.integers(len(objs)))]
    box = [round(v / size, 2) for v in target.box]
    q = f"{GROUNDING_PREFIX} {describe(target)}."
    meta = {
        "objects": [o.as_meta(size) for o in objs],
        "box": box,
        "image_size": [size, size],
        "expression": describe(target),
    }
    return render(objs, size), q, format_box(box), meta


def facts(answer: str, question: str, meta: dict[str, Any]) -> list[str] | None:
    """Where the described object is, and its box in words."""
    objs = meta.get("objects", [])
    if not objs:
        return None
    box = parse_box(answer)
    t = next((o for o in objs if [round(v, 2) for v in o["box"]] == box), objs[0])
    return [f"The {t['color']} {t['shape']} is in the {t['quadrant']} of the image.", box_words(t["box"])]


# --------------------------------------------------------------------------------------------
# CoIN files
# --------------------------------------------------------------------------------------------
def _truth(rec: dict[str, Any], qid: str, question: str, table: dict[str, Any] | None) -> Any:
    """The record's `answer_bbox` (and the image size the box is normalised by)."""
    from sefe_core.coin import Truth, coin_box, coin_size

    box = coin_box(rec.get("answer_bbox"))
    if box is None:
        return "no ground truth: grounding record without a valid answer_bbox"
    meta: dict[str, Any] = {"box": box}
    size = coin_size(rec.get("size"))
    if size is not None:
        meta["image_size"] = size
    raw = rec["answer_bbox"]
    return Truth(raw.strip() if isinstance(raw, str) else "[" + ", ".join(f"{v:g}" for v in box) + "]", meta)


def _train_meta(question: str, answer: str, cid: str, table: dict[str, Any] | None) -> dict[str, Any]:
    box = parse_box(answer)
    return {} if box is None else {"box": box}


COIN = CoinAdapter(truth=_truth, train_meta=_train_meta)


KIND = register(
    TaskKind(
        key="grounding",
        coin_name="Grounding",
        native_style="bbox",
        max_new_tokens=24,
        score=grounding,
        score_reference=grounding_reference,
        content=grounding_content,
        generate=generate,
        facts=facts,
        coin=COIN,
    )
)
