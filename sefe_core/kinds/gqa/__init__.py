"""GQA: spatial relations and attributes of two objects, a short answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sefe_core.kinds import CoinAdapter, TaskKind, register
from sefe_core.scenes import Sample, picture_size, random_scene, render
from sefe_core.scorers import short_content
from sefe_core.styles import SHORT_SUFFIX


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def gqa(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    return float(prediction.strip().rstrip(".").strip().lower() == reference.strip().lower())


def gqa_reference(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    """The reference's GQA rule: the converted prediction equal to the questions file's answer."""
    # jinpeng0528/SEFE scripts/convert_gqa_for_eval.py:14: trailing periods cut, lower-cased,
    # nothing stripped; llava/eval/CoIN/eval_gqa.py:289-293: equal to the answer as written
    return float(prediction.rstrip(".").lower() == reference)


# --------------------------------------------------------------------------------------------
# MiniCoIN
# --------------------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> Sample:
    size = picture_size(rng)
    objs = random_scene(rng, 2, size)
    a, b = objs
    kind = int(rng.integers(3))
    ax, bx = a.box[0], b.box[0]
    ay, by = a.box[1], b.box[1]
    if kind == 0 and a.quadrant.split()[1] != b.quadrant.split()[1]:
        rel = "left" if ax < bx else "right"
        q, ans = f"Is the {a.shape} to the left or to the right of the {b.shape}?", rel
    elif kind == 1 and a.quadrant.split()[0] != b.quadrant.split()[0]:
        rel = "above" if ay < by else "below"
        q, ans = f"Is the {a.shape} above or below the {b.shape}?", rel
    else:
        q, ans = f"What color is the object next to the {b.shape}?", a.color
    meta = {"objects": [o.as_meta(size) for o in objs], "image_size": [size, size]}
    return render(objs, size), f"{q}\n{SHORT_SUFFIX}", ans, meta


def facts(answer: str, question: str, meta: dict[str, Any]) -> list[str] | None:
    """The two objects' quadrants, then the relation or colour asked for."""
    objs = meta.get("objects", [])
    if len(objs) != 2:
        return None
    x, y = objs
    out = [f"The {x['shape']} is in the {x['quadrant']} and the {y['shape']} is in the {y['quadrant']}."]
    if answer in ("left", "right"):
        out.append(f"So the {x['shape']} is to the {answer} of the {y['shape']}.")
    elif answer in ("above", "below"):
        out.append(f"So the {x['shape']} is {answer} the {y['shape']}.")
    else:
        out.append(f"The object next to the {y['shape']} is the {x['color']} {x['shape']}.")
    return out


# --------------------------------------------------------------------------------------------
# CoIN files
# --------------------------------------------------------------------------------------------
def _keyed_table(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError("ground truth must be a JSON object keyed by question id")
    return {str(key): v for key, v in data.items()}


def _truth(rec: dict[str, Any], qid: str, question: str, table: dict[str, Any] | None) -> Any:
    from sefe_core.coin import Truth

    if table is None:
        return None
    row = table.get(qid)
    ans = row.get("answer") if isinstance(row, dict) else None
    if not isinstance(ans, str) or not ans.strip():
        return f"no ground truth: question_id {qid!r} not in the GQA questions file"
    return Truth(ans.strip(), {})


COIN = CoinAdapter(truth_field="gqa_questions", table=_keyed_table, truth=_truth)


KIND = register(
    TaskKind(
        key="gqa",
        coin_name="GQA",
        native_style="short",
        max_new_tokens=6,
        score=gqa,
        score_reference=gqa_reference,
        content=short_content,
        generate=generate,
        facts=facts,
        coin=COIN,
    )
)
