"""OCR-VQA: a book cover's genre and author, read off its colour and pictogram."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sefe_core.kinds import TaskKind, register
from sefe_core.scenes import (
    AUTHORS,
    BACKGROUND,
    COLORS,
    GENRES,
    SHAPES,
    Obj,
    Sample,
    draw_object,
    picture_size,
)
from sefe_core.scorers import exact, short_content
from sefe_core.styles import SHORT_SUFFIX


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def ocrvqa(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    if "unanswerable" in prediction.lower():
        return 0.0
    return exact(prediction, reference, meta)


def ocrvqa_reference(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    """eval_ocrvqa.py's rule: "Unanswerable" anywhere (that case only) is wrong, else lower-cased
    equality with the test file's answer, nothing stripped."""
    # jinpeng0528/SEFE llava/eval/CoIN/eval_ocrvqa.py:26-27: skipped (wrong) when the text holds
    # "Unanswerable", whatever the answer
    if "Unanswerable" in prediction:
        return 0.0
    # :28-29: lower() on both sides (not casefold: "ß" is not "ss")
    return float(prediction.lower() == reference.lower())


# --------------------------------------------------------------------------------------------
# MiniCoIN
# --------------------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> Sample:
    size = picture_size(rng)
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    m = size // 8
    draw.rectangle([m, 0, size - m - 1, size - 1], fill=COLORS[color])  # the cover
    side = size // 2
    pict = Obj(
        shape,
        "white" if color != "white" else "blue",
        "center",
        (size // 2 - side // 2, size // 2 - side // 2, size // 2 + side // 2, size // 2 + side // 2),
    )
    draw_object(draw, pict)
    genre, author = GENRES[color], AUTHORS[shape]
    kind = int(rng.integers(3))
    if kind == 0:
        q, ans = "What is the genre of this book?", genre
    elif kind == 1:
        q, ans = "Who wrote this book?", author
    else:
        others = [g for g in GENRES.values() if g != genre]
        asked = genre if rng.random() < 0.5 else others[int(rng.integers(len(others)))]
        q, ans = f"Is this a {asked} book?", "yes" if asked == genre else "no"
    meta = {
        "cover_color": color,
        "pictogram": shape,
        "genre": genre,
        "author": author,
        "image_size": [size, size],
    }
    return img, f"{q}\n{SHORT_SUFFIX}", ans, meta


def facts(answer: str, question: str, meta: dict[str, Any]) -> list[str] | None:
    """The cover's colour gives the genre, its pictogram the author."""
    if "genre" not in meta:
        return None
    out = [
        f"The cover of the book is {meta['cover_color']}, the colour of {meta['genre']} books.",
        f"The pictogram on the cover is a {meta['pictogram']}, the mark of the author {meta['author']}.",
    ]
    if answer in ("yes", "no"):
        out.append(f"So this book is a {meta['genre']} book.")
    return out


KIND = register(
    TaskKind(
        key="ocrvqa",
        coin_name="OCRVQA",
        native_style="short",
        max_new_tokens=8,
        score=ocrvqa,
        score_reference=ocrvqa_reference,
        content=short_content,
        generate=generate,
        facts=facts,
    )
)
