"""ScienceQA: a multiple-choice question about the picture, answered with the option's letter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sefe_core.kinds import CoinAdapter, TaskKind, register
from sefe_core.scenes import COLORS, LETTERS, QUADRANTS, SHAPES, Sample, picture_size, random_scene, render
from sefe_core.scorers import contains_phrase
from sefe_core.styles import MCQ_SUFFIX

# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
_LETTER_SET = frozenset(LETTERS)
_SQA_SENTENCE = re.compile(r"The answer is ([A-E])(?=\.|\s*$)")
# jinpeng0528/SEFE llava/eval/CoIN/eval_science_qa.py:71: any capital, then any character but a
# newline (the "." is not escaped)
_SQA_SENTENCE_REFERENCE = re.compile(r"The answer is ([A-Z]).")


def _sqa_truth(reference: str, meta: Mapping[str, Any]) -> tuple[int, int]:
    """(answer index, number of options): from meta, else from the reference letter."""
    n = len(meta["options"]) if "options" in meta else len(LETTERS)
    if "answer_index" in meta:
        return int(meta["answer_index"]), n
    ref = reference.strip().rstrip(".")
    if ref not in _LETTER_SET:
        raise ValueError(f"scienceqa: reference {reference!r} is not a letter and meta has no answer_index")
    return LETTERS.index(ref), n


def scienceqa_letter(prediction: str) -> str | None:
    """The option letter under the intended rule, or None (the answer then counts as wrong)."""
    t = prediction.strip()
    if t in _LETTER_SET:
        return t
    if len(t) >= 2 and t[0] in _LETTER_SET and t[1] == "." and (len(t) == 2 or t[2] == " "):
        return t[0]
    found = _SQA_SENTENCE.findall(t)
    return found[0] if len(found) == 1 else None


def _scienceqa_letter_reference(prediction: str) -> str | None:
    """The letter eval_science_qa.py parses from the text as it is (nothing stripped), or None
    (its "FAILED")."""
    t = prediction
    # jinpeng0528/SEFE llava/eval/CoIN/eval_science_qa.py:66-67: one of A-E alone (" B" fails)
    if t in _LETTER_SET:
        return t
    # :68-69: A-E, then a period and a space ("B." alone fails)
    if len(t) >= 3 and t[0] in _LETTER_SET and t[1:3] == ". ":
        return t[0]
    # :70-76: exactly one match of the sentence; its letter may be any capital
    found = _SQA_SENTENCE_REFERENCE.findall(t)
    return found[0] if len(found) == 1 else None


def _letter_score(letter: str | None, reference: str, meta: Mapping[str, Any]) -> float:
    idx, n = _sqa_truth(reference, meta)
    # jinpeng0528/SEFE llava/eval/CoIN/eval_science_qa.py:29-36, 78, 92: a letter counts only among
    # the first len(choices) options (else -1), and is right when its index is the answer's
    if letter is None or letter not in LETTERS[:n]:
        return 0.0
    return float(LETTERS.index(letter) == idx)


def scienceqa(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    return _letter_score(scienceqa_letter(prediction), reference, meta)


def scienceqa_reference(prediction: str, reference: str, meta: Mapping[str, Any]) -> float:
    return _letter_score(_scienceqa_letter_reference(prediction), reference, meta)


# A capital letter standing alone ("B", "(C)", "option D"); "A" followed by a lower-case word is
# the article ("A red ball"), not an option.
_LONE_LETTER = re.compile(r"(?<![A-Za-z])([B-E]|A(?! [a-z]))(?![A-Za-z])")


def scienceqa_content(prediction: str, reference: str, meta: Mapping[str, Any]) -> bool:
    """Right once the format is ignored: every option the answer points to (by a letter anywhere,
    or by the option's text) is the correct one, and it points to at least one."""
    idx, n = _sqa_truth(reference, meta)
    strict = scienceqa_letter(prediction)
    pointed: set[int] = set()
    if strict is not None:
        pointed.add(LETTERS.index(strict))
    else:
        pointed |= {LETTERS.index(m) for m in _LONE_LETTER.findall(prediction)}
        options = [str(o) for o in meta.get("options", [])]
        hits = [i for i, o in enumerate(options) if contains_phrase(prediction, o)]
        # an option whose text is part of another matched option ("left" in "top left") is not
        # pointed to on its own
        hits = [i for i in hits if not any(j != i and contains_phrase(options[j], options[i]) for j in hits)]
        pointed |= set(hits)
    return pointed == {idx} and idx < n


# --------------------------------------------------------------------------------------------
# MiniCoIN
# --------------------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> Sample:
    return _generate(rng, by_place=False)


def generate_round(rng: np.random.Generator, round: int) -> Sample:
    """Later rounds: "Which object is in the top left?" takes the place of "Which object is red?"."""
    return _generate(rng, by_place=round > 1)


def _generate(rng: np.random.Generator, by_place: bool) -> Sample:
    size = picture_size(rng)
    objs = random_scene(rng, int(rng.integers(2, 4)), size)
    target = objs[int(rng.integers(len(objs)))]
    kind = int(rng.integers(3))
    if kind == 0 and by_place:
        question, correct = f"Which object is in the {target.quadrant}?", target.shape
        pool = [s for s in SHAPES if s != correct]
    elif kind == 0:
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


# --------------------------------------------------------------------------------------------
# CoIN files
# --------------------------------------------------------------------------------------------
def _keyed_table(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError("ground truth must be a JSON object keyed by question id")
    return {str(key): v for key, v in data.items()}


def _truth(rec: dict[str, Any], qid: str, question: str, table: dict[str, Any] | None) -> Any:
    """From the problems file (answer index into its choices), else the record's letter answer
    against the options in its question."""
    from sefe_core.coin import Truth, parse_options

    if table is not None:
        prob = table.get(qid)
        if not isinstance(prob, dict) or not isinstance(prob.get("answer"), int):
            return f"no ground truth: question_id {qid!r} not in ScienceQA problems"
        choices = [str(c) for c in prob.get("choices", [])]
        idx = prob["answer"]
        if not 0 <= idx < min(len(choices), len(LETTERS)):
            return f"no ground truth: ScienceQA answer index {idx} outside its {len(choices)} choices"
        return Truth(LETTERS[idx], {"options": choices, "answer_index": idx, "answer_text": choices[idx]})
    ans = rec.get("answer")
    if not isinstance(ans, str) or not ans.strip():
        return None  # the default reports the missing answer
    options = parse_options(question)
    letter = ans.strip().rstrip(".")
    if letter not in LETTERS[: len(options)]:
        return f"no ground truth: ScienceQA answer {ans!r} is not the letter of an option"
    i = LETTERS.index(letter)
    return Truth(letter, {"options": options, "answer_index": i, "answer_text": options[i]})


def _train_meta(question: str, answer: str, cid: str, problems: dict[str, Any] | None) -> dict[str, Any]:
    """Options, answer index/text and the solution (ASD's rules backend explains from it)."""
    from sefe_core.coin import parse_options

    meta: dict[str, Any] = {}
    prob = problems.get(cid) if problems else None
    options = parse_options(question)
    if isinstance(prob, dict):
        options = [str(c) for c in prob.get("choices", [])] or options
        if isinstance(prob.get("solution"), str) and prob["solution"].strip():
            meta["solution"] = prob["solution"].strip()
    letter = answer.strip().rstrip(".")
    if options:
        meta["options"] = options
        if letter in LETTERS[: len(options)]:
            i = LETTERS.index(letter)
            meta.update(answer_index=i, answer_text=options[i])
    return meta


def _test_question(question: str) -> str:
    """As the reference evaluation asks it: the instruction appended to every test question, even
    one that already ends with it (jinpeng0528/SEFE llava/eval/CoIN/model_science_qa.py:64-66;
    run with --single-pred-prompt by scripts/Eval/1_ScienceQA.sh)."""
    return f"{question}\n{MCQ_SUFFIX}"


COIN = CoinAdapter(
    truth_field="scienceqa_problems",
    table=_keyed_table,
    truth=_truth,
    train_meta=_train_meta,
    test_question=_test_question,
)


KIND = register(
    TaskKind(
        key="scienceqa",
        coin_name="ScienceQA",
        native_style="mcq",
        max_new_tokens=4,
        score=scienceqa,
        score_reference=scienceqa_reference,
        content=scienceqa_content,
        generate=generate,
        generate_round=generate_round,
        coin=COIN,
    )
)
