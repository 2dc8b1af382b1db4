"""The six answer styles: the instruction that asks for each, and the check that an answer has it.

ASD appends `STYLE_INSTRUCTIONS[style]` to a rewritten question; evaluation calls `format_ok`
to tell superficial forgetting (right content, wrong format) from essential forgetting. One
definition serves both, so "the format ASD teaches" and "the format evaluation checks" agree.
"""

from __future__ import annotations

import re

# CoIN's response-format instructions (LLaVA-1.5 evaluation prompts); MiniCoIN uses the same.
SHORT_SUFFIX = "Answer the question using a single word or phrase."
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
UNANSWERABLE_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'."
GROUNDING_PREFIX = "Please provide the bounding box coordinate of the region this sentence describes:"

# Response-format instructions, in our own words, consistent with CoIN's (docs/design.md §1.1).
STYLE_INSTRUCTIONS: dict[str, str] = {
    "yes_no": "Answer with Yes or No.",
    "mcq": MCQ_SUFFIX,
    "short": SHORT_SUFFIX,
    "brief": "Answer the question, then explain your answer briefly in about 20 words.",
    "detail": "Answer the question, then explain your answer in detail in about 50 words.",
    "bbox": "Answer with the bounding box [x1, y1, x2, y2] in normalised coordinates.",
}

# Word-count bounds of the explanation styles (targets ~20 and ~50 words).
BRIEF_WORDS = (8, 35)
DETAIL_WORDS = (30, 90)
SHORT_MAX_WORDS = 4

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
BOX_RE = re.compile(r"^\[" + ",".join([_NUM] * 4) + r"\]$")
MCQ_RE = re.compile(r"^(?:([A-E])|([A-E])\.(?: .*)?|The answer is ([A-E])\.?)$", re.DOTALL)


def words(text: str) -> list[str]:
    return text.split()


def parse_box(text: str) -> list[float] | None:
    """Four numbers in brackets, e.g. "[0.10, 0.25, 0.50, 0.75]"; None if the text is not a box."""
    m = BOX_RE.match(text.strip())
    return [float(g) for g in m.groups()] if m else None


def format_ok(style: str, text: str) -> bool:
    """Does `text` have the answer format `style` asks for? (Content is not judged here.)"""
    t = text.strip()
    if style == "yes_no":
        return t.rstrip(".").lower() in {"yes", "no"}
    if style == "mcq":
        return MCQ_RE.match(t) is not None
    if style == "short":
        n = len(words(t))
        return 1 <= n <= SHORT_MAX_WORDS and parse_box(t) is None and not re.fullmatch(r"[A-E]\.?", t)
    if style == "brief":
        return BRIEF_WORDS[0] <= len(words(t)) <= BRIEF_WORDS[1]
    if style == "detail":
        return DETAIL_WORDS[0] <= len(words(t)) <= DETAIL_WORDS[1]
    if style == "bbox":
        return parse_box(t) is not None
    raise ValueError(f"unknown style {style!r}")
