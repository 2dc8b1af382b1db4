"""VizWiz: what is this / what colour is this, and 'unanswerable' for a photo that shows nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import ImageFilter

from sefe_core.kinds import TaskKind, register
from sefe_core.scenes import COLORS, SHAPES, Obj, Sample, phrase, picture_size, render
from sefe_core.scorers import exact, exact_reference, short_content
from sefe_core.styles import SHORT_SUFFIX, UNANSWERABLE_SUFFIX


# --------------------------------------------------------------------------------------------
# MiniCoIN
# --------------------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> Sample:
    size = picture_size(rng)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    side = int(size * rng.uniform(0.6, 0.9))
    x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    obj = Obj(shape, color, "center", (x1, y1, x1 + side, y1 + side))
    img = render([obj], size)
    unanswerable = rng.random() < 0.25
    if unanswerable:  # a photo taken in the dark, out of focus: nothing can be read off it
        img = img.filter(ImageFilter.GaussianBlur(size / 6)).point(lambda v: v // 12)
    kind = int(rng.integers(2))
    q, ans = ("What color is this?", color) if kind == 0 else ("What is this?", shape)
    if unanswerable:
        ans = "unanswerable"
    meta = {"objects": [obj.as_meta(size)], "unanswerable": bool(unanswerable), "image_size": [size, size]}
    return img, f"{q}\n{UNANSWERABLE_SUFFIX}\n{SHORT_SUFFIX}", ans, meta


def facts(answer: str, question: str, meta: dict[str, Any]) -> list[str] | None:
    """An unreadable photo says so; a readable one names its object."""
    objs = meta.get("objects", [])
    if not objs:
        return None
    if meta.get("unanswerable"):
        return [
            "The photo is very dark and badly blurred.",
            "No colour or shape can be made out in it, so the question cannot be answered from it.",
        ]
    o = objs[0]
    return [
        f"The photo shows {phrase(o)}, filling most of the frame.",
        f"Its colour is {o['color']} and its shape is a {o['shape']}.",
    ]


KIND = register(
    TaskKind(
        key="vizwiz",
        coin_name="VizWiz",
        native_style="short",
        max_new_tokens=6,
        score=exact,
        score_reference=exact_reference,
        content=short_content,
        generate=generate,
        facts=facts,
    )
)
