"""What the embedded tiny LLaVA learns before any MiniCoIN task: to see, then to follow instructions.

Real LLaVA-1.5 starts CoIN as a model that reads its images (CLIP was pre-trained first) and
answers in the format it is asked for (its instruction mix used the same response-format
suffixes). The tiny model gets both, in miniature and in two stages:

1. **Vision pre-training** (`pretrain_vision`): the CLIP tower alone, with a throw-away linear
   head that predicts, for each 4x4-pixel cell of the 32-pixel input, the colour, the shape and
   the sign word drawn there, and the cell's row and column. Dense labels teach *where* things
   are (boxes and quadrants need it), not only what; the row/column targets keep each patch's
   position in the features the language model reads.
2. **Instruction pre-training** (run by `tiny_vlm` with Trainer, vision tower frozen as in
   LLaVA): generic questions about the same kinds of pictures in every answer style (short,
   yes/no, lettered options, boxes, a brief explanation), each with the style's instruction, as
   a curriculum of phases (`CURRICULUM`). A uniform mix of everything does not teach the two
   compositions the tasks need (BENCHMARKS.md, "A curriculum for the tiny base"): the language
   model learns to name the colour of *the* object in a one-object picture but not of one
   object among several (binding), and never learns to find the option that says the answer
   and emit its letter (look-up) when that skill competes with everything else from the start.
   So the phases add, one at a time, (a) binding and box questions about one of 2-4 objects,
   (b) a text-only look-up drill ("Which option says red?"), (c) lettered options on pictures,
   easy ones (one object, a cover, two signs) first. Every phase keeps a share of the earlier
   ones so that nothing learnt before is forgotten.

The wording is not a MiniCoIN task's, and task knowledge (which cover colour is which genre,
what a blurred photo should get, the ScienceQA context line) is never shown: each task still
has something to learn from its own data. (The one prompt it shares with a task is LLaVA-1.5's
referring-expression prompt, which real LLaVA learned from RefCOCO before CoIN; so the base
grounds objects before MiniCoIN's Grounding task, as LLaVA-1.5 does before CoIN's.)

`probe` measures stage 2 on held-out generic questions (colour, shape, position, count, sign
word, box, lettered options) against chance, so a base that does not read its images shows it
at build time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from sefe_core import scenes
from sefe_core.hashing import stable_seed
from sefe_core.scenes import (
    AUTHORS,
    BACKGROUND,
    COLORS,
    GENRES,
    LETTERS,
    QUADRANTS,
    SHAPES,
    SIGN_WORDS,
    Obj,
    draw_object,
    draw_sign,
    format_box,
)
from sefe_core.styles import GROUNDING_PREFIX, MCQ_SUFFIX, SHORT_SUFFIX, STYLE_INSTRUCTIONS

COLOR_NAMES = list(COLORS)
# Dense label classes (0 = nothing there).
SHAPE_CLASSES = [*SHAPES, "sign", "cover"]
GRID = 8  # label cells per side of the processed image (32 px -> 4 px cells, 2x2 per 8 px patch)


# --------------------------------------------------------------------------------------------
# Pictures with their label maps
# --------------------------------------------------------------------------------------------
@dataclass
class Picture:
    """A rendered picture, its dense labels (GRID x GRID: colour, shape, sign word) and the facts
    the generic questions are asked about."""

    image: Image.Image
    labels: np.ndarray  # (3, GRID, GRID) int64
    kind: str  # scene | object | signs | cover
    objects: list[Obj]
    signs: list[dict[str, Any]]
    cover: dict[str, str] | None = None


def _label_maps(
    size: int, draw_fn: Callable[[ImageDraw.ImageDraw, ImageDraw.ImageDraw, ImageDraw.ImageDraw], None]
) -> np.ndarray:
    maps = [Image.new("L", (size, size), 0) for _ in range(3)]
    draw_fn(*(ImageDraw.Draw(m) for m in maps))
    return np.stack([np.asarray(m.resize((GRID, GRID), Image.NEAREST), dtype=np.int64) for m in maps])


def _objects_labels(objs: list[Obj], size: int) -> np.ndarray:
    def draw(c: ImageDraw.ImageDraw, s: ImageDraw.ImageDraw, w: ImageDraw.ImageDraw) -> None:
        for o in objs:
            draw_object(c, o, fill=1 + COLOR_NAMES.index(o.color))
            draw_object(s, o, fill=1 + SHAPE_CLASSES.index(o.shape))

    return _label_maps(size, draw)


def random_picture(rng: np.random.Generator) -> Picture:
    """One of the picture kinds MiniCoIN draws: a scene of 1-4 objects in quadrants, one object
    anywhere, two signs, or a book cover with a pictogram."""
    size = int(rng.choice([32, 40, 48]))
    kind = str(rng.choice(["scene", "scene", "object", "signs", "cover"]))
    if kind == "scene":
        objs = scenes.random_scene(rng, int(rng.integers(1, 5)), size)
        return Picture(scenes.render(objs, size), _objects_labels(objs, size), kind, objs, [])
    if kind == "object":
        side = int(size * rng.uniform(0.5, 0.85))
        x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        o = Obj(SHAPES[int(rng.integers(len(SHAPES)))], COLOR_NAMES[int(rng.integers(len(COLORS)))], "center",
                (x1, y1, x1 + side, y1 + side))  # fmt: skip
        return Picture(scenes.render([o], size), _objects_labels([o], size), kind, [o], [])
    if kind == "signs":
        c1, c2 = (COLOR_NAMES[i] for i in rng.permutation(len(COLORS))[:2])
        w1, w2 = (SIGN_WORDS[i] for i in rng.permutation(len(SIGN_WORDS))[:2])
        img = Image.new("RGB", (size, size), BACKGROUND)
        draw, half, signs = ImageDraw.Draw(img), size // 2, []
        for side_i, (color, word) in enumerate(((c1, w1), (c2, w2))):
            x1 = side_i * half + 2
            box = (x1, size // 4, x1 + half - 4, 3 * size // 4)
            draw_sign(draw, box, COLORS[color], word)
            signs.append({"color": color, "word": word, "side": ("left", "right")[side_i], "box": box})

        def draw_labels(c: ImageDraw.ImageDraw, s: ImageDraw.ImageDraw, w: ImageDraw.ImageDraw) -> None:
            for sg in signs:
                b = [sg["box"][0], sg["box"][1], sg["box"][2] - 1, sg["box"][3] - 1]
                c.rectangle(b, fill=1 + COLOR_NAMES.index(sg["color"]))
                s.rectangle(b, fill=1 + SHAPE_CLASSES.index("sign"))
                w.rectangle(b, fill=1 + SIGN_WORDS.index(sg["word"]))

        return Picture(img, _label_maps(size, draw_labels), kind, [], signs)
    color, shape = COLOR_NAMES[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw, m, side = ImageDraw.Draw(img), size // 8, size // 2
    draw.rectangle([m, 0, size - m - 1, size - 1], fill=COLORS[color])
    pict = Obj(shape, "white" if color != "white" else "blue", "center",
               (size // 2 - side // 2, size // 2 - side // 2, size // 2 + side // 2, size // 2 + side // 2))  # fmt: skip
    draw_object(draw, pict)

    def draw_cover(c: ImageDraw.ImageDraw, s: ImageDraw.ImageDraw, w: ImageDraw.ImageDraw) -> None:
        c.rectangle([m, 0, size - m - 1, size - 1], fill=1 + COLOR_NAMES.index(color))
        s.rectangle([m, 0, size - m - 1, size - 1], fill=1 + SHAPE_CLASSES.index("cover"))
        draw_object(c, pict, fill=1 + COLOR_NAMES.index(pict.color))
        draw_object(s, pict, fill=1 + SHAPE_CLASSES.index(shape))

    return Picture(img, _label_maps(size, draw_cover), kind, [pict], [], {"color": color, "shape": shape})


# --------------------------------------------------------------------------------------------
# Stage 1: the vision tower alone
# --------------------------------------------------------------------------------------------
def pretrain_vision(
    model: torch.nn.Module, processor: Any, steps: int, batch: int, lr: float, seed: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Train `model`'s vision tower on dense labels; returns the held-out cell accuracy per head.

    The head reads the patch tokens of the layer LLaVA feeds its projector
    (`vision_feature_layer`), so what it learns is what the language model will see."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    hidden = tower.config.hidden_size
    patches = tower.config.image_size // tower.config.patch_size
    sub = GRID // patches  # label cells per patch side
    n_classes = [1 + len(COLORS), 1 + len(SHAPE_CLASSES), 1 + len(SIGN_WORDS), GRID, GRID]
    rows = torch.arange(GRID).view(1, GRID, 1).expand(1, GRID, GRID)
    where = torch.cat([rows, rows.transpose(1, 2)])  # (2, GRID, GRID): each cell's row and column
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, sub * sub * sum(n_classes))
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=gen)
        head.bias.zero_()
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(stable_seed("vision-pretrain", seed))

    def batch_of(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pics = [random_picture(rng) for _ in range(n)]
        pix = processor.image_processor([p.image for p in pics], return_tensors="pt")["pixel_values"]
        labels = torch.as_tensor(np.stack([p.labels for p in pics]))
        return pix, torch.cat([labels, where.unsqueeze(0).expand(n, -1, -1, -1)], dim=1)

    def logits(pix: torch.Tensor) -> list[torch.Tensor]:
        feats = tower(pix, output_hidden_states=True).hidden_states[layer][:, 1:]  # (B, P*P, H)
        out = head(feats).view(feats.shape[0], patches, patches, sub, sub, sum(n_classes))
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(feats.shape[0], GRID, GRID, sum(n_classes))
        return list(out.split(n_classes, dim=-1))

    tower.train()
    for step in range(steps):
        pix, labels = batch_of(batch)
        loss = sum(
            torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[:, i].reshape(-1))
            for i, lg in enumerate(logits(pix))
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    tower.eval()
    with torch.no_grad():
        pix, labels = batch_of(512)
        acc = {}
        names = ("colour", "shape", "sign_word", "row", "column")
        for i, (name, lg) in enumerate(zip(names, logits(pix), strict=True)):
            on = labels[:, i] > 0 if i < 3 else labels[:, i] >= 0  # contents: where something is drawn
            acc[name] = float((lg.argmax(-1)[on] == labels[:, i][on]).float().mean())
    return acc


# --------------------------------------------------------------------------------------------
# Stage 2: generic instructions in every answer style
# --------------------------------------------------------------------------------------------
@dataclass
class PretrainSample:
    image: Any  # PIL image, rendered in memory
    question: str
    answer: str
    kind: str = ""  # the question kind (probe groups by it)
    family: str = "generic"  # the curriculum family it was drawn for (FAMILIES)

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "question": self.question, "answer": self.answer}


def _short(q: str) -> str:
    return f"{q}\n{SHORT_SUFFIX}"


def _mcq(rng: np.random.Generator, q: str, correct: str, pool: list[str]) -> tuple[str, str]:
    n = int(rng.integers(2, 5))
    others = [p for p in pool if p != correct]
    opts = [correct] + [others[i] for i in rng.permutation(len(others))[: n - 1]]
    opts = [opts[i] for i in rng.permutation(len(opts))]
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts))
    return f"{q}\n{lines}\n{MCQ_SUFFIX}", LETTERS[opts.index(correct)]


def _box(o: Obj, size: int) -> str:
    return format_box([round(v / size, 2) for v in o.box])


def _brief(answer: str, reason: str) -> str:
    return f"{answer[0].upper()}{answer[1:]}. {reason}"


def _questions(p: Picture, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(kind, question, answer) candidates for a picture; one is drawn per sample."""
    size = p.image.size[0]
    out: list[tuple[str, str, str]] = []
    if p.kind in ("scene", "object"):
        o = p.objects[int(rng.integers(len(p.objects)))]
        where = f"in the {o.quadrant} part" if p.kind == "scene" else "in the picture"
        out += [
            ("colour", _short(f"Which colour does the {o.shape} have?"), o.color),
            ("shape", _short(f"Name the {o.color} shape."), o.shape),
            ("box", f"Where exactly is the {o.color} {o.shape}? {STYLE_INSTRUCTIONS['bbox']}", _box(o, size)),
            # LLaVA-1.5's own referring-expression prompt (its RefCOCO data, which CoIN's Grounding
            # reuses): real LLaVA knows how to answer it before CoIN, so the tiny one does too
            ("box", f"{GROUNDING_PREFIX} {o.color} {o.shape}.", _box(o, size)),
            ("mcq", *_mcq(rng, f"Which shape is {o.color}?", o.shape, list(SHAPES))),
            ("mcq", *_mcq(rng, f"Which colour does the {o.shape} have?", o.color, COLOR_NAMES)),
            ("brief", f"Which colour does the {o.shape} have? {STYLE_INSTRUCTIONS['brief']}",
             _brief(o.color, f"The {o.shape} {where} is drawn in {o.color}, so {o.color} is the colour it has.")),
        ]  # fmt: skip
        c = COLOR_NAMES[int(rng.integers(len(COLORS)))]
        present = any(x.color == c for x in p.objects)
        out.append(
            (
                "yes_no",
                f"Can you see something {c}? {STYLE_INSTRUCTIONS['yes_no']}",
                "Yes" if present else "No",
            )
        )
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        present = any(x.shape == s for x in p.objects)
        out.append(
            (
                "yes_no",
                f"Does the picture contain a {s}? {STYLE_INSTRUCTIONS['yes_no']}",
                "Yes" if present else "No",
            )
        )
    if p.kind == "scene":
        o = p.objects[int(rng.integers(len(p.objects)))]
        order = sorted(p.objects, key=lambda x: QUADRANTS.index(x.quadrant))
        out += [
            ("position", _short(f"In which part of the picture is the {o.color} {o.shape}?"), o.quadrant),
            ("count", _short("Count the shapes."), str(len(p.objects))),
            ("caption", "Describe the image.", ", ".join(f"{x.color} {x.shape}" for x in order)),
            ("mcq", *_mcq(rng, f"In which part of the picture is the {o.shape}?", o.quadrant, list(QUADRANTS))),
        ]  # fmt: skip
    if p.kind == "signs":
        sg = p.signs[int(rng.integers(len(p.signs)))]
        out += [
            ("sign_word", _short(f"Read the word on the {sg['side']} sign."), sg["word"]),
            ("colour", _short(f"Which colour is the {sg['side']} sign?"), sg["color"]),
            ("mcq", *_mcq(rng, f"Which word is on the {sg['color']} sign?", sg["word"], list(SIGN_WORDS))),
            ("mcq", *_mcq(rng, f"Which word is on the {sg['side']} sign?", sg["word"], list(SIGN_WORDS))),
        ]
    if p.kind == "cover":
        out += [
            ("colour", _short("Which colour is the cover of this book?"), p.cover["color"]),
            ("shape", _short("Name the shape drawn on the cover."), p.cover["shape"]),
            ("mcq", *_mcq(rng, "Which colour is the cover of this book?", p.cover["color"], COLOR_NAMES)),
            ("mcq", *_mcq(rng, "Which shape is drawn on the cover?", p.cover["shape"], list(SHAPES))),
        ]
    return out


def _drill(rng: np.random.Generator) -> tuple[str, str, str]:
    """Repeat-after-me: every answer word and box string MiniCoIN asks for is emitted somewhere,
    without teaching what it means (genres, authors, 'unanswerable' stay the tasks' business)."""
    if rng.random() < 0.3:
        xs, ys = sorted(rng.uniform(0, 1, 2).round(2)), sorted(rng.uniform(0, 1, 2).round(2))
        a = format_box([xs[0], ys[0], xs[1], ys[1]])
    else:
        vocab = scenes.answer_vocabulary() + list(GENRES.values()) + list(AUTHORS.values())
        a = vocab[int(rng.integers(len(vocab)))]
    return "drill", f"Repeat after me: {a}", a


def generic_sample(
    rng: np.random.Generator, box_share: float = 0.0, drill_share: float = 0.08
) -> PretrainSample:
    """One generic sample: a picture and one of its questions, drawn uniformly, or a drill.

    `box_share`: the share of questions on pictures with objects that ask for a box. Drawn
    uniformly, a box is one candidate among ~10, and the finest skill the mix teaches gets the
    fewest samples: reading a box out of the patch features takes tens of thousands of them
    (BENCHMARKS.md, "Base variants")."""
    p = random_picture(rng)
    if rng.random() < drill_share:
        kind, q, a = _drill(rng)
    else:
        cands = _questions(p, rng)
        boxes = [c for c in cands if c[0] == "box"]
        if boxes and box_share > 0 and rng.random() < box_share:
            cands = boxes
        kind, q, a = cands[int(rng.integers(len(cands)))]
    return PretrainSample(p.image, q, a, kind)


def instruction_mix(
    n: int, seed: int, drill_share: float = 0.08, box_share: float = 0.0
) -> list[PretrainSample]:
    """`n` generic samples over MiniCoIN-like pictures, worded unlike any task prompt."""
    rng = np.random.default_rng(stable_seed("pretrain", seed))
    return [generic_sample(rng, box_share, drill_share) for _ in range(n)]


def _crowded(p: Picture) -> bool:
    """Several objects: a question about one of them has to find it first (binding)."""
    return p.kind == "scene" and len(p.objects) >= 2


def _about_picture(rng: np.random.Generator, kinds: set[str], crowded: bool | None) -> PretrainSample:
    """A question of one of `kinds` about a picture with several objects (crowded=True), with one
    thing to look at (False: one object, a cover, two signs) or any (None)."""
    while True:
        p = random_picture(rng)
        if crowded is not None and _crowded(p) != crowded:
            continue
        cands = [c for c in _questions(p, rng) if c[0] in kinds]
        if cands:
            kind, q, a = cands[int(rng.integers(len(cands)))]
            return PretrainSample(p.image, q, a, kind)


def lookup_drill(rng: np.random.Generator) -> PretrainSample:
    """Text only: "Which option says red?" over lettered options -> the letter. The look-up
    circuit that lettered options on a picture need, without having to read the picture."""
    pool = [*COLOR_NAMES, *SHAPES, *QUADRANTS, *SIGN_WORDS]
    word = pool[int(rng.integers(len(pool)))]
    question, letter = _mcq(rng, f"Which option says {word}?", word, pool)
    return PretrainSample(None, question, letter, "lookup")


# family -> a sample of it (box_share applies to the generic family only)
FAMILIES: dict[str, Callable[[np.random.Generator, float], PretrainSample]] = {
    "generic": lambda rng, box_share: generic_sample(rng, box_share),
    # a short answer about one of 2-4 objects: its colour, its shape, its quadrant
    "binding": lambda rng, _: _about_picture(rng, {"colour", "shape", "position"}, crowded=True),
    # the box of one of 2-4 objects
    "boxes": lambda rng, _: _about_picture(rng, {"box"}, crowded=True),
    "lookup": lambda rng, _: lookup_drill(rng),
    # lettered options where the answer is easy to see, then on any picture
    "choice_easy": lambda rng, _: _about_picture(rng, {"mcq"}, crowded=False),
    "choice": lambda rng, _: _about_picture(rng, {"mcq"}, crowded=None),
}


@dataclass(frozen=True)
class Phase:
    """One phase of the instruction pre-training: a mix of families, at `lr_scale` x the
    configured learning rate. Each phase is one Trainer run (its own warm-up and cosine decay)."""

    name: str
    mix: dict[str, float]
    lr_scale: float = 1.0


# The order matters (BENCHMARKS.md, "A curriculum for the tiny base"): binding, the look-up and
# lettered options learnt all at once stay at chance for thousands of steps; learnt in this order
# each takes a phase. Every phase keeps a share of the earlier ones.
CURRICULUM: tuple[Phase, ...] = (
    Phase("see", {"generic": 1.0}),
    Phase("bind", {"generic": 0.6, "binding": 0.25, "boxes": 0.15}),
    Phase("look-up", {"lookup": 0.7, "generic": 0.15, "binding": 0.15}),
    Phase(
        "choose",
        {"choice_easy": 0.3, "choice": 0.2, "lookup": 0.1, "generic": 0.15, "binding": 0.15, "boxes": 0.1},
        lr_scale=0.5,
    ),  # fmt: skip
)


class PhaseData(torch.utils.data.Dataset):
    """`n` samples of a phase's mix. Sample i is drawn from its own seed, so nothing is held in
    memory and it is the same whatever order Trainer asks for it in."""

    def __init__(self, phase: Phase, n: int, seed: int, box_share: float, stream: str = "train"):
        self.n, self.box_share = n, box_share
        self.seed = stable_seed(f"pretrain-{stream}-{phase.name}", seed)
        self.families = list(phase.mix)
        weights = np.array([phase.mix[f] for f in self.families], dtype=float)
        self.weights = weights / weights.sum()

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> PretrainSample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        family = self.families[int(rng.choice(len(self.families), p=self.weights))]
        return replace(FAMILIES[family](rng, self.box_share), family=family)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.sample(i).as_dict()


# probe kind -> chance of a uniform guess ("box": IoU > 0.5 with the true box; no fair guess, 0)
# ("options": lettered options on any picture, 2-4 of them: chance is the mean of 1/2, 1/3, 1/4)
PROBE_KINDS = {"colour": 1 / len(COLORS), "shape": 1 / len(SHAPES), "position": 1 / len(QUADRANTS),
               "count": 1 / 4, "sign_word": 1 / len(SIGN_WORDS), "box": 0.0,
               "options": (1 / 2 + 1 / 3 + 1 / 4) / 3}  # fmt: skip
# generic question kind -> the probe kind it is reported under, where the names differ
_PROBE_KIND = {"mcq": "options"}


def probe_samples(n_per_kind: int, seed: int) -> dict[str, list[PretrainSample]]:
    """Held-out generic questions of the probe kinds (their own seed: never trained on)."""
    rng = np.random.default_rng(stable_seed("probe", seed))
    out: dict[str, list[PretrainSample]] = {k: [] for k in PROBE_KINDS}
    while any(len(v) < n_per_kind for v in out.values()):
        p = random_picture(rng)
        for kind, q, a in _questions(p, rng):
            kind = _PROBE_KIND.get(kind, kind)
            if kind in out and len(out[kind]) < n_per_kind:
                out[kind].append(PretrainSample(p.image, q, a, kind))
                break
    return out


def probe(model: Any, processor: Any, n_per_kind: int = 100, seed: int = 1) -> dict[str, dict[str, float]]:
    """Accuracy of greedy answers per probe kind, with the chance level of guessing uniformly."""
    from sefe_core.scorers import iou as box_iou
    from sefe_core.styles import parse_box
    from sefe_core.vlm import generate_answers

    def right(pred: str, ref: str, kind: str) -> bool:
        if kind == "box":
            box = parse_box(pred)
            return box is not None and box_iou(box, parse_box(ref)) > 0.5
        return pred.strip().lower() == ref.lower()

    out = {}
    for kind, samples in probe_samples(n_per_kind, seed).items():
        preds = generate_answers(
            model, processor, [s.as_dict() for s in samples], max_new_tokens=24, count=False
        )
        acc = float(np.mean([right(p, s.answer, kind) for p, s in zip(preds, samples, strict=True)]))
        out[kind] = {"accuracy": acc, "chance": PROBE_KINDS[kind]}
    return out
