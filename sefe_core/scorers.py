"""Scoring: what the eight CoIN scorers share (EvalAI answer normalisation, VQA soft accuracy,
exact match, IoU), and the per-prediction judgement. Each task kind's own rules live in its unit
(sefe_core/kinds/<kind>/); `get_scorer` and `judge` find them by the task's kind.

Every scorer takes the model's answer, the record's `answer` and its `meta` dict, and returns a
score in [0, 1]. Two rule sets:

* ``compat="intended"`` (default): what each reference evaluator means to measure.
* ``compat="reference"``: the reference evaluators' code, quirks included, to reproduce published
  numbers. Followed: what the SEFE repository's ``scripts/Eval/*.sh`` run (jinpeng0528/SEFE, the
  code behind the paper's tables): its ``llava/eval/CoIN/eval_*.py``, ``llava/eval/m4c_evaluator.py``
  (LLaVA's EvalAI answer normalisation and TextVQA soft accuracy) and
  ``scripts/convert_gqa_for_eval.py``. CoIN's copies (zackschen/CoIN, ``ETrain/Eval/LLaVA/CoIN/``)
  have the same rules but for ScienceQA, whose letter CoIN reads with another pattern. This is our
  own code written to those rules, not a copy.

Where the two differ (each one is tested in ``tests/test_scorers.py``; each reference rule names
its file and lines in a comment beside its code). The model's answer reaches the scorer already
stripped (sefe_core/vlm.py, as the reference's ``model_*.py`` strips the decoded text), so the
reference's missing strips bite only on text fed in by hand. The reference string is compared as
the record holds it (sefe_core/coin.py strips CoIN's answers, which the reference reads as they
are: a difference only for an answer written with surrounding whitespace):

============ ============================================ ==========================================
scorer       reference evaluator                          intended rule (default)
============ ============================================ ==========================================
scienceqa    the letter alone, "X. " + anything, or       the letter alone, "X." / "X. ...", or
             exactly one ``The answer is ([A-Z]).``:      exactly one "The answer is X" followed by
             the unescaped ``.`` takes any character      "." or the end; surrounding whitespace is
             but a newline, so "The answer is Bob" reads  ignored; "A." alone is A; a letter past
             as B and "The answer is B" (no period)       the question's options is wrong
             fails; "A." alone fails; no strip; a letter
             past the question's choices is wrong
textvqa      EvalAI normalisation that removes at most    the same soft accuracy with every such
             32 periods (``re.UNICODE`` passed as         period removed
             ``sub``'s count), then the leave-one-out
             soft accuracy over the annotators' answers
imagenet     raw, case-sensitive substring either way:    case-insensitive, whole words, either
             an empty answer is always right, "all" is    way; an empty answer is wrong
             right for "ball", "Ball" wrong
gqa          strips trailing "." and lower-cases the      strips whitespace and trailing ".",
             prediction only; no whitespace strip         case-insensitive on both sides
vizwiz/vqav2 ``pred.upper() == gt.upper()``, no strip     ``casefold`` equality after stripping
             (so "ı" equals "i")                          whitespace
ocrvqa       an answer containing "Unanswerable" (that    an answer containing "unanswerable" in
             case only) is wrong; else                    any case is wrong; else as vizwiz
             ``pred.lower() == gt.lower()``, no strip
grounding    strips brackets then drops the first and     exactly four numbers, optionally in
             last characters (so y2 loses its last        brackets; IoU > 0.5 on the boxes as
             digit: 0.47 -> 0.4; "1.0" as x1 -> 0.0;      written
             "(0.1, 0.2, 0.3, 0.4)" is a box); both
             boxes are scaled by the image's longer side
             before IoU > 0.5, which moves answers at
             IoU 0.5 either way
============ ============================================ ==========================================

What the reference decides per file, not per answer, is not a scorer's to copy (our records are
matched by id and averaged over the test split): ScienceQA divides by the number of predictions
while scoring every problem of the split, ImageNet pairs answers with the test file by position,
GQA counts only questions marked ``isBalanced``, and TextVQA refuses (asserts) any question
without exactly ten answers, where we score the answers there are (one answer: exact match).

`content_ok` is the lenient half of the forgetting split (docs/design.md §1.5): is the answer right
once its format is ignored (the option letter or text found anywhere, the short answer contained
in a sentence, a box found inside other text)? `judge` returns all of it for one prediction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sefe_core.styles import format_ok

if TYPE_CHECKING:
    from sefe_core.kinds import ContentFn, ScoreFn
    from sefe_core.registry import TaskSpec

Compat = Literal["intended", "reference"]
COMPAT_MODES: tuple[str, ...] = ("intended", "reference")
LETTERS = "ABCDE"
IOU_THRESHOLD = 0.5

# --------------------------------------------------------------------------------------------
# EvalAI / VQA answer normalisation (LLaVA's m4c_evaluator.EvalAIAnswerProcessor, itself from
# the official VQA evaluation; jinpeng0528/SEFE llava/eval/m4c_evaluator.py:6-217, its word lists
# at :13-175, whose capitalised "Im"/"Ive"/"Id've" keys no lower-cased word reaches). Rules:
# lower-case; drop "," and "?"; split "'s"; punctuation touching a space is removed, inside a word
# it becomes a space; a "." not followed by a digit is removed; number words -> digits; articles
# dropped; missing apostrophes restored.
# --------------------------------------------------------------------------------------------
_CONTRACTIONS: dict[str, str] = dict(
    pair.split("=")
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split()
)
_NUMBERS = dict(
    zip(
        "none zero one two three four five six seven eight nine ten".split(),
        "0 0 1 2 3 4 5 6 7 8 9 10".split(),
        strict=True,
    )
)
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# jinpeng0528/SEFE llava/eval/m4c_evaluator.py:151,194: the pattern `(?!<=\d)(\.)(?!\d)` is a
# typo for a look-behind; as a look-ahead it never fires, so the rule is "a period not followed by
# a digit". Its `sub` gets re.UNICODE (32) where the count goes, so it removes at most 32 periods;
# the reference rule keeps that limit (period_limit), the intended one removes them all.
_PERIOD = re.compile(r"\.(?!\d)")
EVALAI_PERIOD_LIMIT = int(re.UNICODE)


def normalize_answer(text: str, *, period_limit: int = 0) -> str:
    """EvalAI answer normalisation, as the TextVQA evaluator applies it (the reference's VQAv2
    evaluator compares raw text, see exact_reference). `period_limit`:
    remove at most that many periods (0: all; EVALAI_PERIOD_LIMIT is the reference's)."""
    # m4c_evaluator.py:180-183, 212-217: word_tokenize, then newlines and tabs, then strip
    t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    # m4c_evaluator.py:185-193: each mark is dropped where it touches a space (judged on the text
    # before any replacement), else replaced by a space
    out = t
    for p in _PUNCTUATION:
        if p + " " in t or " " + p in t or _DIGIT_COMMA.search(t):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=period_limit)
    # m4c_evaluator.py:197-210: number words, then articles, then contractions, word by word
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def contains_phrase(text: str, phrase: str) -> bool:
    """Whole-word containment of normalised `phrase` in normalised `text` ("red" is in "a red
    ball", "all" is not in "ball")."""
    t, p = normalize_answer(text), normalize_answer(phrase)
    return bool(p) and f" {p} " in f" {t} "


def _yes_no_exclusive(prediction: str, truth: str) -> bool:
    """For a yes/no truth, a sentence that says both "yes" and "no" is not an answer."""
    t = normalize_answer(truth)
    if t not in ("yes", "no"):
        return True
    other = "no" if t == "yes" else "yes"
    return not contains_phrase(prediction, other)


def contains_answer(prediction: str, truth: str) -> bool:
    return contains_phrase(prediction, truth) and _yes_no_exclusive(prediction, truth)


# --------------------------------------------------------------------------------------------
# VQA soft accuracy (TextVQA's ten annotators)
# --------------------------------------------------------------------------------------------
def vqa_soft_accuracy(prediction: str, answers: list[str], *, period_limit: int = 0) -> float:
    """Leave-one-out VQA accuracy: the mean, over each annotator left out in turn, of
    min(1, matches among the other annotators / 3), after normalisation (`period_limit` as in
    normalize_answer). With a single answer (no annotators to leave out) it is exact match after
    normalisation."""
    pred = normalize_answer(prediction, period_limit=period_limit)
    gts = [normalize_answer(a, period_limit=period_limit) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    # jinpeng0528/SEFE llava/eval/m4c_evaluator.py:224-245, 250-252: the same mean, summed in
    # annotator order; leaving out annotator k removes one match exactly when k's answer is the
    # prediction
    matches = sum(g == pred for g in gts)
    total = sum(min(1.0, (matches - (g == pred)) / 3) for g in gts)
    return total / len(gts)


# --------------------------------------------------------------------------------------------
# Exact match (VizWiz, VQAv2) and the short answer found in a sentence
# --------------------------------------------------------------------------------------------
def exact(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    """VizWiz and VQAv2 as CoIN scores them: exact, case-insensitive (single reference answer)."""
    return float(prediction.strip().casefold() == reference.strip().casefold())


def exact_reference(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    """VizWiz and VQAv2 as the reference scores them: upper-cased equality, nothing stripped."""
    # jinpeng0528/SEFE llava/eval/CoIN/eval_vizwiz.py:23-27 and eval_vqav2.py:22-26: the test
    # file's own `answer` against the text, both upper-cased (so "ı" equals "i", unlike casefold)
    return float(prediction.upper() == reference.upper())


def short_content(prediction: str, reference: str, meta: Mapping[str, Any]) -> bool:
    """The reference answer appears, as whole words, in the answer ("The sign says stop.")."""
    return contains_answer(prediction, reference)


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------
def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes; 0 for an empty or inverted box."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Registry and the per-prediction judgement
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scorer:
    """One CoIN evaluator: the intended rule, the reference evaluator's rule, the lenient check
    (a view of a task kind's three scoring functions, sefe_core/kinds/)."""

    name: str
    intended: ScoreFn
    reference: ScoreFn
    content: ContentFn


def get_scorer(name: str) -> Scorer:
    from sefe_core.kinds import KINDS

    if name not in KINDS:
        raise KeyError(f"unknown scorer {name!r}; known: {sorted(KINDS)}")
    k = KINDS[name]
    return Scorer(name, k.score, k.score_reference, k.content)


def score(
    scorer: str, prediction: str, reference: str, meta: Mapping[str, Any], compat: Compat = "intended"
) -> float:
    """Score one answer in [0, 1] under the intended rule or the reference evaluator's."""
    s = get_scorer(scorer)
    if compat == "intended":
        return s.intended(prediction, reference, meta)
    if compat == "reference":
        return s.reference(prediction, reference, meta)
    raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")


def content_ok(scorer: str, prediction: str, reference: str, meta: Mapping[str, Any]) -> bool:
    """Right once the format is ignored. Always true when the intended scorer gives any credit,
    so the content matrix is never below the accuracy matrix and their gap is the format's."""
    s = get_scorer(scorer)
    return s.intended(prediction, reference, meta) > 0 or s.content(prediction, reference, meta)


@dataclass(frozen=True)
class Judgement:
    """Everything evaluation records about one answer."""

    score: float
    score_reference: float
    format_ok: bool
    content_ok: bool


def judge(spec: TaskSpec, prediction: str, reference: str, meta: Mapping[str, Any]) -> Judgement:
    """Score an answer to a task's native question: both rule sets, format, content."""
    s = get_scorer(spec.scorer)
    intended = s.intended(prediction, reference, meta)
    return Judgement(
        score=intended,
        score_reference=s.reference(prediction, reference, meta),
        format_ok=format_ok(spec.native_style, prediction),
        content_ok=intended > 0 or s.content(prediction, reference, meta),
    )
