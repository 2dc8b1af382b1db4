"""MiniCoIN: a procedurally generated 8-task benchmark that mirrors CoIN one to one.

Every sample is a small PIL-drawn scene (coloured shapes on a dark background, 32-48 px,
square) plus a question in the CoIN task's own prompt format. Each record keeps its scene
metadata (objects, colours, quadrants, boxes) in `meta`, so scorers and the rules rewriter of ASD
work without a model. Same seed -> byte-identical Parquet and PNG files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_contracts import INSTRUCTIONS, FileInfo, InstructionRecord
from sefe_core.hashing import stable_seed
from sefe_core.registry import (
    GROUNDING_PREFIX,
    MCQ_SUFFIX,
    SHORT_SUFFIX,
    UNANSWERABLE_SUFFIX,
    TaskSpec,
    benchmark_tasks,
)

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


@dataclass(frozen=True)
class MiniCoINConfig:
    """Sizes of the embedded default: enough training for each task to be learned (75 optimizer
    steps of the minicoin preset), 100 test samples per task (one sample = 1 point), and `sefe
    run` (six methods x eight tasks, evaluated after each task) within 6 minutes on 2 CPU cores."""

    seed: int = 0
    n_train: int = 400
    n_test: int = 100
    tasks: tuple[str, ...] = field(default_factory=lambda: tuple(t.name for t in benchmark_tasks("minicoin")))


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------
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


def _size(rng: np.random.Generator) -> int:
    return int(rng.choice([32, 40, 48]))


def _describe(o: Obj) -> str:
    return f"{o.color} {o.shape}"


# --------------------------------------------------------------------------------------------
# The eight task generators. Each returns (image, question, answer, meta).
# --------------------------------------------------------------------------------------------
Sample = tuple[Image.Image, str, str, dict[str, Any]]


def _scienceqa(rng: np.random.Generator) -> Sample:
    size = _size(rng)
    objs = random_scene(rng, int(rng.integers(2, 4)), size)
    target = objs[int(rng.integers(len(objs)))]
    kind = int(rng.integers(3))
    if kind == 0:
        question, correct = f"Which object is {target.color}?", target.shape
        pool = [s for s in SHAPES if s != correct]
    elif kind == 1:
        question, correct = f"What color is the {target.shape}?", target.color
        pool = [c for c in COLORS if c != correct]
    else:
        question, correct = f"Where is the {target.shape}?", target.quadrant
        pool = [q for q in QUADRANTS if q != correct]
    context = "The picture shows a few objects on a dark table."
    n_opts = int(rng.integers(2, 5))
    options = [correct] + [pool[i] for i in rng.permutation(len(pool))[: n_opts - 1]]
    order = rng.permutation(n_opts)
    options = [options[i] for i in order]
    answer_index = options.index(correct)
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    q = f"{question}\nContext: {context}\n" + "\n".join(lines) + f"\n{MCQ_SUFFIX}"
    meta = {
        "objects": [o.as_meta(size) for o in objs],
        "options": options,
        "answer_index": answer_index,
        "answer_text": correct,
        "image_size": [size, size],
    }
    return render(objs, size), q, LETTERS[answer_index], meta


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


def _textvqa(rng: np.random.Generator) -> Sample:
    size = _size(rng)
    names = list(COLORS)
    c1, c2 = (names[i] for i in rng.permutation(len(names))[:2])
    w1, w2 = (SIGN_WORDS[i] for i in rng.permutation(len(SIGN_WORDS))[:2])
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    half = size // 2
    signs = []
    for side, (color, word) in enumerate(((c1, w1), (c2, w2))):
        x1 = side * half + 2
        box = (x1, size // 4, x1 + half - 4, 3 * size // 4)
        draw_sign(draw, box, COLORS[color], word)
        signs.append(
            {
                "color": color,
                "word": word,
                "side": ("left", "right")[side],
                "box": [round(v / size, 2) for v in box],
            }
        )
    target = signs[int(rng.integers(2))]
    q = f"What is written on the {target['color']} sign?\nReference OCR token: {w1}, {w2}\n{SHORT_SUFFIX}"
    answer = target["word"]
    # Ten annotator answers as in TextVQA; one annotator in five misreads the other sign.
    other = w2 if answer == w1 else w1
    answers = [answer if rng.random() > 0.1 else other for _ in range(10)]
    meta = {"signs": signs, "ocr_tokens": [w1, w2], "answers": answers, "image_size": [size, size]}
    return img, q, answer, meta


def _imagenet(rng: np.random.Generator) -> Sample:
    size = _size(rng)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    side = int(size * rng.uniform(0.5, 0.8))
    x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    obj = Obj(shape, color, "center", (x1, y1, x1 + side, y1 + side))
    q = f"What is the object in the image?\n{SHORT_SUFFIX}"
    meta = {"objects": [obj.as_meta(size)], "classes": list(SHAPES), "image_size": [size, size]}
    return render([obj], size), q, shape, meta


def _gqa(rng: np.random.Generator) -> Sample:
    size = _size(rng)
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


def _vizwiz(rng: np.random.Generator) -> Sample:
    size = _size(rng)
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


def format_box(box: list[float] | tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def _grounding(rng: np.random.Generator) -> Sample:
    size = _size(rng)
    objs = random_scene(rng, int(rng.integers(2, 4)), size)
    target = objs[int(rng.integers(len(objs)))]
    box = [round(v / size, 2) for v in target.box]
    q = f"{GROUNDING_PREFIX} {_describe(target)}."
    meta = {
        "objects": [o.as_meta(size) for o in objs],
        "box": box,
        "image_size": [size, size],
        "expression": _describe(target),
    }
    return render(objs, size), q, format_box(box), meta


def _vqav2(rng: np.random.Generator) -> Sample:
    size = _size(rng)
    n = int(rng.integers(1, 5))
    objs = random_scene(rng, n, size)
    kind = int(rng.integers(3))
    if kind == 0:
        q, ans = "How many objects are there?", str(n)
    elif kind == 1:
        o = objs[int(rng.integers(n))]
        q, ans = f"What color is the {o.shape}?", o.color
    else:
        absent = [s for s in SHAPES if all(o.shape != s for o in objs)]
        shape = (
            objs[int(rng.integers(n))].shape if rng.random() < 0.5 else absent[int(rng.integers(len(absent)))]
        )
        present = any(o.shape == shape for o in objs)
        q, ans = f"Is there a {shape}?", "yes" if present else "no"
    meta = {"objects": [o.as_meta(size) for o in objs], "image_size": [size, size]}
    return render(objs, size), f"{q}\n{SHORT_SUFFIX}", ans, meta


def _ocrvqa(rng: np.random.Generator) -> Sample:
    size = _size(rng)
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


GENERATORS: dict[str, Callable[[np.random.Generator], Sample]] = {
    "scienceqa": _scienceqa,
    "textvqa": _textvqa,
    "imagenet": _imagenet,
    "gqa": _gqa,
    "vizwiz": _vizwiz,
    "grounding": _grounding,
    "vqav2": _vqav2,
    "ocrvqa": _ocrvqa,
}


def answer_vocabulary() -> list[str]:
    """Every answer word MiniCoIN can ask for (boxes excluded: they are number sequences)."""
    words = set(LETTERS[:4]) | set(COLORS) | set(SHAPES) | set(QUADRANTS) | set(SIGN_WORDS)
    words |= set(GENRES.values()) | set(AUTHORS.values()) | {"left", "right", "above", "below"}
    words |= {"yes", "no", "unanswerable"} | {str(n) for n in range(1, 5)}
    return sorted(words)


# --------------------------------------------------------------------------------------------
# Writing the benchmark
# --------------------------------------------------------------------------------------------
def generate_task(spec: TaskSpec, split: str, n: int, seed: int, image_root: Path) -> list[InstructionRecord]:
    """Generate one split of one task; images are written as PNG under `image_root/<task>/<split>/`."""
    gen = GENERATORS[spec.scorer]
    rng = np.random.default_rng(stable_seed("minicoin", seed, spec.name, split))
    out_dir = image_root / spec.name / split
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img, q, ans, meta = gen(rng)
        rel = f"{spec.name}/{split}/{i:05d}.png"
        img.save(image_root / rel, format="PNG", optimize=False)
        rid = f"{spec.name}-{split}-{i:05d}"
        records.append(
            InstructionRecord(
                id=rid,
                task=spec.name,
                split=split,
                image=rel,
                question=q,
                answer=ans,
                style=spec.native_style,
                origin="original",
                source_id=rid,
                meta=json.dumps(meta, sort_keys=True),
            )
        )
    return records


def build_minicoin(out_dir: str | Path, config: MiniCoINConfig = MiniCoINConfig()) -> dict[str, FileInfo]:
    """Write `<out_dir>/<task>.parquet` (train + test records) and `<out_dir>/images/`.

    Returns the file info (sha256, bytes) of each task's Parquet.
    """
    out_dir = Path(out_dir)
    specs = {t.name: t for t in benchmark_tasks("minicoin")}
    unknown = [t for t in config.tasks if t not in specs]
    if unknown:
        raise KeyError(f"MiniCoIN has no task(s) {unknown}; tasks: {list(specs)}")
    if config.n_train < 1 or config.n_test < 1:
        raise ValueError("MiniCoIN needs n_train >= 1 and n_test >= 1")
    infos = {}
    for name in config.tasks:
        spec = specs[name]
        records = generate_task(spec, "train", config.n_train, config.seed, out_dir / "images")
        records += generate_task(spec, "test", config.n_test, config.seed, out_dir / "images")
        infos[name] = INSTRUCTIONS.write(records, out_dir / f"{name}.parquet")
    return infos
