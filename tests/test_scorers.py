"""The eight CoIN scorers: each rule on hand-written cases, intended vs reference quirks, content."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sefe_core.registry import SCORERS, benchmark_tasks, task_spec
from sefe_core.scorers import (
    EVALAI_PERIOD_LIMIT,
    IOU_THRESHOLD,
    content_ok,
    iou,
    judge,
    normalize_answer,
    score,
    vqa_soft_accuracy,
)

SQA = {"options": ["box", "ball", "tent", "ring"], "answer_index": 1}  # correct: B. ball


def both(scorer: str, pred: str, ref: str, meta: dict) -> tuple[float, float]:
    return score(scorer, pred, ref, meta), score(scorer, pred, ref, meta, compat="reference")


@pytest.mark.parametrize(
    "pred, intended, reference",
    [
        ("B", 1, 1),
        ("B. ball", 1, 1),
        ("The answer is B.", 1, 1),
        ("A", 0, 0),
        ("b", 0, 0),
        ("E", 0, 0),  # a letter beyond the four options
        (" B ", 1, 0),  # the reference does not strip
        ("B.", 1, 0),  # "X." alone: the reference needs "X. " (three characters)
        ("The answer is B", 1, 0),  # no period: the reference's unescaped "." needs a character
        ("The answer is Bob.", 0, 1),  # ... which any character satisfies
        ("The answer is B. The answer is C.", 0, 0),  # more than one: no answer
        ("The answer is F.", 0, 0),  # the reference's [A-Z] reads F, which is no option
        ("The answer is Z. The answer is B.", 1, 0),  # ... and counts it: two sentences, no answer
        ("The answer is B\nC", 0, 0),  # its "." takes any character but a newline
        ("B.ball", 0, 0),  # "X." then anything but a space
        ("ball", 0, 0),
        ("", 0, 0),
    ],
)
def test_scienceqa(pred: str, intended: float, reference: float) -> None:
    assert both("scienceqa", pred, "B", SQA) == (intended, reference)


def test_scienceqa_reference_letter_past_the_choices() -> None:
    """eval_science_qa.py's get_pred_idx: a letter counts only among the first len(choices)
    options, whichever path read it (an answer index past the options makes that visible)."""
    meta = {"options": ["box", "ball", "tent"], "answer_index": 3}
    for pred in ("D", "D. ring", "The answer is D."):
        assert score("scienceqa", pred, "D", meta, compat="reference") == 0.0
    meta = {"options": ["box", "ball", "tent"], "answer_index": 2}
    assert score("scienceqa", "C", "C", meta, compat="reference") == 1.0


@pytest.mark.parametrize(
    "pred, ok",
    [
        ("ball", True),  # the option text without its letter: superficial, content right
        ("A ball", True),  # "A" followed by a word is the article, not option A
        ("I think it is B", True),
        ("The ball, option B", True),
        ("box or ball", False),  # two options: not an answer
        ("tent", False),
        ("C", False),
        ("", False),
    ],
)
def test_scienceqa_content(pred: str, ok: bool) -> None:
    assert content_ok("scienceqa", pred, "B", SQA) is ok


def test_scienceqa_content_prefers_the_longer_option() -> None:
    meta = {"options": ["left", "top left", "bottom right"], "answer_index": 1}
    assert content_ok("scienceqa", "top left", "B", meta)
    assert not content_ok("scienceqa", "left", "B", meta)
    # without options in meta the reference letter is the truth
    assert score("scienceqa", "C", "C", {}) == 1.0


def test_evalai_normalisation() -> None:
    assert normalize_answer("The Stop!") == "stop"
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("e-mail") == "e mail"  # punctuation inside a word becomes a space
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays


def test_evalai_normalisation_period_limit() -> None:
    """m4c_evaluator.py:194 passes re.UNICODE where sub's count goes: at most 32 periods go."""
    assert EVALAI_PERIOD_LIMIT == 32
    assert normalize_answer("stop" + "." * 40) == "stop"  # the intended rule: every period
    assert normalize_answer("stop" + "." * 32, period_limit=EVALAI_PERIOD_LIMIT) == "stop"
    assert normalize_answer("stop" + "." * 40, period_limit=EVALAI_PERIOD_LIMIT) == "stop" + "." * 8
    # periods before a digit are kept and not counted
    assert normalize_answer("3.5" + "." * 33, period_limit=EVALAI_PERIOD_LIMIT) == "3.5."


def test_textvqa_soft_accuracy() -> None:
    answers = ["stop"] * 7 + ["open"] * 3
    meta = {"answers": answers}
    assert both("textvqa", "stop", "stop", meta) == (1.0, 1.0)
    # leaving out one of the three "open" annotators leaves 2 matches (2/3), any other leaves 3 (1)
    assert score("textvqa", "Open.", "stop", meta) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # a single dissenting annotator: 1/3 for the nine others left out, 0 when it is
    assert vqa_soft_accuracy("exit", ["stop"] * 9 + ["exit"]) == pytest.approx(0.3)
    assert score("textvqa", "bank", "stop", meta) == 0.0
    assert content_ok("textvqa", "the sign says stop", "stop", meta)
    assert content_ok("textvqa", "it reads open", "stop", meta)  # a minority answer earns credit too
    assert not content_ok("textvqa", "stop or open", "stop", meta)  # two answers: not an answer
    assert not content_ok("textvqa", "bank", "stop", meta)
    assert score("textvqa", "stop", "stop", {}) == 1.0  # no annotators: exact after normalisation


def test_textvqa_reference_removes_at_most_32_periods() -> None:
    """The reference's normalisation stops after 32 periods, on the answer and the annotators'."""
    meta = {"answers": ["stop"] * 7 + ["open"] * 3}
    assert both("textvqa", "stop" + "." * 32, "stop", meta) == (1.0, 1.0)
    assert both("textvqa", "stop" + "." * 33, "stop", meta) == (1.0, 0.0)
    dotted = {"answers": ["stop" + "." * 33] * 10}
    assert both("textvqa", "stop", "stop", dotted) == (1.0, 0.0)
    assert both("textvqa", "stop" + "." * 33, "stop", dotted) == (1.0, 1.0)


@pytest.mark.parametrize(
    "pred, ref, intended, reference",
    [
        ("ball", "ball", 1, 1),
        ("a red ball", "ball", 1, 1),
        ("tabby", "tabby cat", 1, 1),  # the answer inside the class name
        ("Ball", "ball", 1, 0),  # the reference is case-sensitive
        ("", "ball", 0, 1),  # the reference counts an empty answer as right
        ("all", "ball", 0, 1),  # ... and any substring
        ("balls", "ball", 0, 1),
        ("a ball", "ball ", 1, 0),  # the reference string is not stripped either
        ("box", "ball", 0, 0),
    ],
)
def test_imagenet(pred: str, ref: str, intended: float, reference: float) -> None:
    assert both("imagenet", pred, ref, {}) == (intended, reference)


@pytest.mark.parametrize(
    "pred, ref, intended, reference",
    [
        ("left", "left", 1, 1),
        ("Left.", "left", 1, 1),
        (" left", "left", 1, 0),  # the reference strips nothing but trailing periods
        ("  left", "left", 1, 0),
        ("left ", "left", 1, 0),
        ("left. ", "left", 1, 0),  # rstrip(".") stops at the space
        ("LEFT..", "left", 1, 1),  # every trailing period goes, the prediction is lower-cased
        ("left", " left", 1, 0),  # the answer is compared as written
        ("left", "Left", 1, 0),  # the reference lower-cases the prediction only
        ("right", "left", 0, 0),
    ],
)
def test_gqa(pred: str, ref: str, intended: float, reference: float) -> None:
    assert both("gqa", pred, ref, {}) == (intended, reference)


@pytest.mark.parametrize("scorer", ["vizwiz", "vqav2"])
def test_vizwiz_vqav2_exact(scorer: str) -> None:
    assert both(scorer, "Unanswerable", "unanswerable", {}) == (1, 1)
    assert both(scorer, "YES", "yes", {}) == (1, 1)
    assert both(scorer, "yes ", "yes", {}) == (1, 0)
    assert both(scorer, "yes", " yes", {}) == (1, 0)  # the answer is not stripped either
    assert both(scorer, "ı", "i", {}) == (0, 1)  # upper() makes the dotless i an I; casefold does not
    assert both(scorer, "Yes, it is.", "yes", {}) == (0, 0)
    assert content_ok(scorer, "Yes, it is.", "yes", {})
    assert not content_ok(scorer, "yes and no", "yes", {})
    assert content_ok(scorer, "three objects", "3", {})


def test_ocrvqa() -> None:
    assert both("ocrvqa", "Poetry", "poetry", {}) == (1, 1)
    assert both("ocrvqa", "Unanswerable", "unanswerable", {}) == (0, 0)
    # only the capitalised word is caught by the reference
    assert both("ocrvqa", "UNANSWERABLE", "unanswerable", {}) == (0, 1)
    assert both("ocrvqa", "a poetry book", "poetry", {}) == (0, 0)
    assert content_ok("ocrvqa", "a poetry book", "poetry", {})


@pytest.mark.parametrize(
    "pred, ref, intended, reference",
    [
        ("unanswerable", "unanswerable", 0, 1),  # lower case is not caught: lower() == lower()
        ("Unanswerable", "Unanswerable", 0, 0),  # "Unanswerable" is wrong whatever the answer
        ("Unanswerable poetry", "unanswerable poetry", 0, 0),  # anywhere in the answer
        ("Straße", "STRASSE", 1, 0),  # lower(), not casefold
        ("poetry ", "poetry", 1, 0),  # nothing stripped
        ("Poetry", " poetry", 1, 0),
    ],
)
def test_ocrvqa_reference(pred: str, ref: str, intended: float, reference: float) -> None:
    assert both("ocrvqa", pred, ref, {}) == (intended, reference)


THIN = {"box": [0.1, 0.4, 0.5, 0.49]}  # a flat box: y2's last digit matters


@pytest.mark.parametrize(
    "pred, intended, reference",
    [
        ("[0.10, 0.40, 0.50, 0.49]", 1, 0),  # the reference reads y2 as 0.4: an empty box
        ("[0.1, 0.4, 0.5, 0.49]", 1, 0),
        ("0.10, 0.40, 0.50, 0.49", 1, 0),  # without brackets
        ("[0.10, 0.39, 0.50, 0.501]", 1, 1),  # y2 = 0.50 for the reference: still IoU > 0.5
        ("The box is [0.10, 0.40, 0.50, 0.49].", 0, 0),  # a sentence is not a box
        ("[0.50, 0.49, 0.10, 0.40]", 0, 0),  # inverted
        ("(0.10, 0.40, 0.50, 0.49)", 0, 1),  # the reference cuts any first and last character
        ("x0.10, 0.40, 0.50, 0.49y", 0, 1),
        ("[0.10, 0.40, 0.50]", 0, 0),  # not four numbers
        ("[0.10, 0.40, 0.50, 0.49, 0.60]", 0, 0),
        ("red ball", 0, 0),
    ],
)
def test_grounding(pred: str, intended: float, reference: float) -> None:
    assert both("grounding", pred, "[0.10, 0.40, 0.50, 0.49]", THIN) == (intended, reference)


def test_grounding_reference_scales_by_the_longer_side() -> None:
    """eval_grounding.py:79-81 multiplies both boxes by max(size) before the IoU: the IoU is the
    same, its rounding is not. Here it is 0.5000000000000001 as written and 0.49999999999999994
    at 480, so the image size decides the answer."""
    truth = {"box": [0.19, 0.21, 0.82, 0.53]}
    pred = "[0.43, 0.21, 0.79, 0.490]"  # the reference reads y2 as 0.49
    assert iou([0.43, 0.21, 0.79, 0.49], truth["box"]) > IOU_THRESHOLD
    assert both("grounding", pred, "", truth) == (1.0, 1.0)  # no image size: the boxes as written
    assert both("grounding", pred, "", {**truth, "image_size": [480, 360]}) == (1.0, 0.0)
    assert both("grounding", pred, "", {**truth, "image_size": [360, 480]}) == (1.0, 0.0)
    assert both("grounding", pred, "", {**truth, "image_size": [640, 480]}) == (1.0, 1.0)


def test_grounding_iou_threshold_and_content() -> None:
    truth = {"box": [0.0, 0.0, 0.5, 0.5]}
    assert iou([0.0, 0.0, 0.5, 0.25], truth["box"]) == 0.5
    assert score("grounding", "[0.0, 0.0, 0.5, 0.25]", "", truth) == 0.0  # IoU must exceed 0.5
    assert score("grounding", "[0.0, 0.0, 0.5, 0.26]", "", truth) == 1.0
    assert content_ok("grounding", "The box is [0.0, 0.0, 0.5, 0.3].", "", truth)
    assert content_ok("grounding", "x1 0.0 y1 0.0 x2 0.5 y2 0.3", "", truth)
    assert not content_ok("grounding", "[0.6, 0.6, 0.9, 0.9]", "", truth)
    # the reference string is the truth when meta has no box
    assert score("grounding", "[0.10, 0.40, 0.50, 0.49]", "[0.10, 0.40, 0.50, 0.49]", {}) == 1.0


def test_judge_combines_format_and_content() -> None:
    sqa = task_spec("minicoin", "01-scienceqa")
    j = judge(sqa, "ball", "B", SQA)
    assert (j.score, j.score_reference, j.format_ok, j.content_ok) == (0.0, 0.0, False, True)
    j = judge(sqa, "B", "B", SQA)
    assert (j.score, j.format_ok, j.content_ok) == (1.0, True, True)
    box = task_spec("minicoin", "06-grounding")
    j = judge(box, "[0.10, 0.40, 0.50, 0.49]", "", THIN)
    assert (j.score, j.score_reference, j.format_ok) == (1.0, 0.0, True)
    with pytest.raises(KeyError, match="unknown scorer"):
        score("poem", "x", "y", {})
    with pytest.raises(ValueError, match="compat"):
        score("gqa", "x", "y", {}, compat="published")  # type: ignore[arg-type]


def test_every_registered_task_has_its_scorer() -> None:
    assert {t.scorer for t in benchmark_tasks("minicoin")} == set(SCORERS)


META = {
    "scienceqa": ("B", SQA),
    "textvqa": ("stop", {"answers": ["stop"] * 8 + ["open"] * 2}),
    "imagenet": ("ball", {}),
    "gqa": ("left", {}),
    "vizwiz": ("unanswerable", {}),
    "grounding": ("[0.10, 0.40, 0.50, 0.49]", THIN),
    "vqav2": ("yes", {}),
    "ocrvqa": ("poetry", {}),
}
WORDS = [
    "B",
    "B.",
    "ball",
    "stop",
    "open",
    "left",
    "yes",
    "no",
    "poetry",
    "unanswerable",
    "[0.10, 0.40,",
    "0.50, 0.49]",
    "The answer is",
    ".",
    " ",
    "A",
]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(META)), st.lists(st.sampled_from(WORDS), max_size=5).map("".join))
def test_scores_in_range_and_content_covers_right_answers(scorer: str, pred: str) -> None:
    ref, meta = META[scorer]
    s, r = both(scorer, pred, ref, meta)
    assert 0.0 <= s <= 1.0 and 0.0 <= r <= 1.0
    if s > 0:  # any credit from the scorer means the content is right
        assert content_ok(scorer, pred, ref, meta)
