"""MiniCoIN's pictures: the vocabulary (colours, shapes, quadrants, sign words, the OCR-VQA
cover code), drawing a scene, and describing one in words. Shared by the task kinds' generators
(sefe_core/kinds/), the tiny base model's pre-training and the rules rewriter of ASD."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 255),
    "yellow": (240, 230, 40),
    "purple": (170, 60, 220),
    "white": (245, 245, 245),
}
SHAPES = ("ball", "box", "tent", "bar", "ring", "cross", "diamond", "pole")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SIGN_WORDS = ("stop", "open", "exit", "cafe", "hotel", "bank", "taxi", "park", "sale", "gym", "bus", "zoo")
# OCR-VQA mirror: the cover colour gives the genre, the pictogram on the cover gives the author.
GENRES = dict(zip(COLORS, ("mystery", "cooking", "travel", "comics", "history", "poetry"), strict=True))
AUTHORS = dict(
    zip(SHAPES, ("smith", "jones", "brown", "garcia", "miller", "davis", "lopez", "wilson"), strict=True)
)
LETTERS = "ABCDE"
BACKGROUND = (20, 20, 24)


@dataclass
class Obj:
    shape: str
    color: str
    quadrant: str
    box: tuple[int, int, int, int]  # pixels, x1 y1 x2 y2 (exclusive end)

    def as_meta(self, size: int) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "quadrant": self.quadrant,
            "box": [round(v / size, 2) for v in self.box],
        }


def draw_object(draw: ImageDraw.ImageDraw, o: Obj, fill: int | tuple[int, int, int] | None = None) -> None:
    """Draw `o` in its colour, or in `fill` (the tiny model's vision pre-training draws label maps
    with the same strokes)."""
    x1, y1, x2, y2 = o.box
    c = COLORS[o.color] if fill is None else fill
    t = max(2, (x2 - x1) // 4)  # stroke width
    if o.shape == "ball":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=c)
    elif o.shape == "box":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=c)
    elif o.shape == "tent":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2) // 2, y1)], fill=c)
    elif o.shape == "bar":
        draw.rectangle([x1, (y1 + y2) // 2 - t, x2 - 1, (y1 + y2) // 2 + t - 1], fill=c)
    elif o.shape == "pole":
        draw.rectangle([(x1 + x2) // 2 - t, y1, (x1 + x2) // 2 + t - 1, y2 - 1], fill=c)
    elif o.shape == "ring":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], outline=c, width=t)
    elif o.shape == "cross":
        draw.rectangle([x1, (y1 + y2) // 2 - t // 2 - 1, x2 - 1, (y1 + y2) // 2 + t // 2], fill=c)
        draw.rectangle([(x1 + x2) // 2 - t // 2 - 1, y1, (x1 + x2) // 2 + t // 2, y2 - 1], fill=c)
    elif o.shape == "diamond":
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        draw.polygon([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], fill=c)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(o.shape)


def _place(
    rng: np.random.Generator, size: int, quadrant: str, scale: float = 1.0
) -> tuple[int, int, int, int]:
    """A box inside one quadrant, 55-85% of the quadrant's side, jittered."""
    half = size // 2
    side = int(half * scale * rng.uniform(0.55, 0.85))
    qx = 0 if "left" in quadrant else half
    qy = 0 if "top" in quadrant else half
    x1 = qx + int(rng.integers(0, half - side + 1))
    y1 = qy + int(rng.integers(0, half - side + 1))
    return (x1, y1, x1 + side, y1 + side)


def random_scene(rng: np.random.Generator, n_objects: int, size: int, distinct: str = "both") -> list[Obj]:
    """`n_objects` objects in distinct quadrants; `distinct` says which attributes must not repeat."""
    quads = rng.permutation(len(QUADRANTS))[:n_objects]
    shapes = (
        rng.permutation(len(SHAPES))[:n_objects]
        if distinct in ("both", "shape")
        else rng.integers(0, len(SHAPES), n_objects)
    )
    colors = (
        rng.permutation(len(COLORS))[:n_objects]
        if distinct in ("both", "color")
        else rng.integers(0, len(COLORS), n_objects)
    )
    names = list(COLORS)
    return [
        Obj(SHAPES[s], names[c], QUADRANTS[q], _place(rng, size, QUADRANTS[q]))
        for s, c, q in zip(shapes, colors, quads, strict=True)
    ]


def render(objs: list[Obj], size: int, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for o in objs:
        draw_object(draw, o)
    return img


def picture_size(rng: np.random.Generator) -> int:
    return int(rng.choice([32, 40, 48]))


def describe(o: Obj) -> str:
    return f"{o.color} {o.shape}"


def draw_sign(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill: int | tuple[int, int, int], word: str
) -> None:
    """A sign: a filled rectangle with a word-specific glyph, dark stripes whose count and spacing
    encode the word's index (the "text" an OCR model reads)."""
    draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=fill)
    k = SIGN_WORDS.index(word)
    for j in range(1 + k % 3):
        y = box[1] + 2 + j * 3 + (k // 3)
        draw.line([box[0] + 2, y, box[2] - 3, y], fill=BACKGROUND, width=1)


def format_box(box: list[float] | tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def answer_vocabulary() -> list[str]:
    """Every answer word MiniCoIN can ask for (boxes excluded: they are number sequences)."""
    words = set(LETTERS[:4]) | set(COLORS) | set(SHAPES) | set(QUADRANTS) | set(SIGN_WORDS)
    words |= set(GENRES.values()) | set(AUTHORS.values()) | {"left", "right", "above", "below"}
    words |= {"yes", "no", "unanswerable"} | {str(n) for n in range(1, 5)}
    return sorted(words)


# What a task kind's MiniCoIN generator returns: (image, question, answer, meta).
Sample = tuple[Image.Image, str, str, dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Scenes in words
# --------------------------------------------------------------------------------------------
def phrase(o: dict[str, Any]) -> str:
    where = "in the middle" if o["quadrant"] == "center" else f"in the {o['quadrant']}"
    return f"a {o['color']} {o['shape']} {where}"


def listing(objects: list[dict[str, Any]], where: bool = True) -> str:
    parts = [phrase(o) if where else f"a {o['color']} {o['shape']}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def box_words(box: list[float]) -> str:
    x1, y1, x2, y2 = (f"{v:.2f}" for v in box)
    return f"Its box runs from {x1} to {x2} across and from {y1} to {y2} down, in normalised coordinates."


def scene_facts(answer: str, question: str, meta: dict[str, Any]) -> list[str]:
    """Sentences that say why `answer` is right, from a scene's objects (the rules rewriter's
    explanation of a task kind without facts of its own)."""
    objs: list[dict[str, Any]] = meta.get("objects", [])
    a, q = answer, question
    if not objs:
        return []
    if q.startswith("How many"):
        return [f"There are {len(objs)} objects in the picture: {listing(objs, where=False)}."]
    if a in ("yes", "no"):
        asked = next((s for s in SHAPES if re.search(rf"\b{s}\b", q)), None)
        hit = next((o for o in objs if o["shape"] == asked), None)
        return [
            f"There is {phrase(hit)} in the picture."
            if hit
            else f"The picture shows {listing(objs, where=False)}, but no {asked}."
        ]
    t = object_answered(answer, objs)
    if a == t["shape"]:
        return [f"The {t['color']} object in the picture is a {t['shape']}."]
    if a == t["color"]:
        return [f"The {t['shape']} in the picture is {t['color']}."]
    return [f"The {t['shape']} appears in the {t['quadrant']} part of the picture."]


def object_answered(answer: str, objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The object whose shape, colour or quadrant the answer names (else the first)."""
    return next((o for o in objs if answer in (o["shape"], o["color"], o["quadrant"])), objs[0])
