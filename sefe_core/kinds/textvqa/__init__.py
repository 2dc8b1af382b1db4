"""TextVQA: read the word on one of two signs (OCR tokens given), scored by VQA soft accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sefe_core.kinds import CoinAdapter, TaskKind, register
from sefe_core.scenes import BACKGROUND, COLORS, SIGN_WORDS, Sample, draw_sign, picture_size
from sefe_core.scorers import EVALAI_PERIOD_LIMIT, contains_answer, normalize_answer, vqa_soft_accuracy
from sefe_core.styles import SHORT_SUFFIX


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def _textvqa_answers(reference: str, meta: Mapping[str, Any]) -> list[str]:
    answers = meta.get("answers")
    if answers is None:
        return [reference]
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"textvqa: meta 'answers' must be a non-empty list, got {answers!r:.80}")
    return [str(a) for a in answers]


def textvqa(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    return vqa_soft_accuracy(prediction, _textvqa_answers(reference, meta))


def textvqa_reference(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    """m4c's TextVQA accuracy for one answer: as the intended rule, but the EvalAI normalisation
    of the answer and of every annotator's stops after 32 periods."""
    # jinpeng0528/SEFE llava/eval/CoIN/eval_textvqa.py:41-49: the text against the val file's
    # `answers`; llava/eval/m4c_evaluator.py:247-253: the answer's soft score, 0 when no annotator
    # gave it. :229 asserts ten answers; with fewer or more we score the ones there are.
    answers = _textvqa_answers(reference, meta)
    return vqa_soft_accuracy(prediction, answers, period_limit=EVALAI_PERIOD_LIMIT)


def textvqa_content(prediction: str, reference: str, meta: Mapping[str, Any]) -> bool:
    """The answer contains (whole words) exactly one of the annotators' distinct answers: any
    annotator answer earns soft credit, so any one of them is content the scorer would accept."""
    answers = {normalize_answer(a) for a in _textvqa_answers(reference, meta)} - {""}
    found = [a for a in answers if contains_answer(prediction, a)]
    found = [a for a in found if not any(b != a and f" {a} " in f" {b} " for b in found)]
    return len(found) == 1


# --------------------------------------------------------------------------------------------
# MiniCoIN
# --------------------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> Sample:
    return _generate(rng, by_side=False)


def generate_round(rng: np.random.Generator, round: int) -> Sample:
    """Later rounds: the sign is named by its side ("the sign on the left"), not its colour."""
    return _generate(rng, by_side=round > 1)


def _generate(rng: np.random.Generator, by_side: bool) -> Sample:
    size = picture_size(rng)
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
    which = f"sign on the {target['side']}" if by_side else f"{target['color']} sign"
    q = f"What is written on the {which}?\nReference OCR token: {w1}, {w2}\n{SHORT_SUFFIX}"
    answer = target["word"]
    # Ten annotator answers as in TextVQA; one annotator in five misreads the other sign.
    other = w2 if answer == w1 else w1
    answers = [answer if rng.random() > 0.1 else other for _ in range(10)]
    meta = {"signs": signs, "ocr_tokens": [w1, w2], "answers": answers, "image_size": [size, size]}
    return img, q, answer, meta


def facts(answer: str, question: str, meta: dict[str, Any]) -> list[str] | None:
    """Which sign reads what, and that the OCR tokens are the two signs' words."""
    signs = meta.get("signs")
    if not signs:
        return None
    hit = next((s for s in signs if s["word"] == answer), signs[0])
    other = next(s for s in signs if s is not hit)
    return [
        f"The {hit['color']} sign on the {hit['side']} reads {hit['word']}.",
        f"The other sign, the {other['color']} one on the {other['side']}, reads {other['word']}.",
        f"The reference OCR tokens {meta['ocr_tokens'][0]} and {meta['ocr_tokens'][1]} "
        "match the words on the two signs.",
    ]


# --------------------------------------------------------------------------------------------
# CoIN files
# --------------------------------------------------------------------------------------------
def _table(data: Any) -> dict[str, Any]:
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError("ground truth must be an object with a 'data' list")
    return {str(r["question_id"]): r for r in rows if isinstance(r, dict) and "question_id" in r}


def _truth(rec: dict[str, Any], qid: str, question: str, table: dict[str, Any] | None) -> Any:
    """The ten annotators' answers of the val file; the majority one is the reference string."""
    from sefe_core.coin import Truth, majority_answer

    if table is None:
        return None
    row = table.get(qid)
    answers = row.get("answers") if isinstance(row, dict) else None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return f"no ground truth: question_id {qid!r} has no answers in the TextVQA val file"
    return Truth(majority_answer(answers), {"answers": answers})


COIN = CoinAdapter(truth_field="textvqa_val", table=_table, truth=_truth)


KIND = register(
    TaskKind(
        key="textvqa",
        coin_name="TextVQA",
        native_style="short",
        max_new_tokens=6,
        score=textvqa,
        score_reference=textvqa_reference,
        content=textvqa_content,
        generate=generate,
        generate_round=generate_round,
        facts=facts,
        coin=COIN,
    )
)
