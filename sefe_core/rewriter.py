"""ASD rewriter backends: given original records, return the material each requested answer style
needs (distractors, an explanation), or a rejection with its reason and the raw text seen.

Two backends share one interface (`Rewriter.rewrite`):

- `rules` (no model): distractors and explanations from what the data already holds (existing
  options, other class names, the other OCR token, perturbed boxes, MiniCoIN scene metadata).
- `openai`: any OpenAI-compatible chat server (`vllm serve ...`, `transformers serve ...`). All
  questions of one image go in one request, the image as a data URI, JSON requested through
  `response_format` json_schema; requests run concurrently, are retried with exponential backoff
  on connection errors / 5xx / 429, and a server that stays down ends in `RewriterUnavailable`.

Whatever a backend returns is checked by `validate_material` before ASD uses it: a model's answer
is data only once its shape, count, bounds and distinctness have been verified.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import mimetypes
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from data_contracts import InstructionRecord
from sefe_core.hashing import config_hash, stable_seed
from sefe_core.minicoin import AUTHORS, COLORS, GENRES, QUADRANTS, SHAPES, SIGN_WORDS, format_box
from sefe_core.registry import SCORERS
from sefe_core.styles import parse_box

# Words of an explanation (the answer itself comes on top): brief ~20, detail ~50, inside the
# whole-answer bounds of `styles.BRIEF_WORDS` / `styles.DETAIL_WORDS` for answers up to ~5 words.
EXPLANATION_WORDS: dict[str, tuple[int, int]] = {"brief": (7, 30), "detail": (29, 84)}
EXPLANATION_TARGET: dict[str, int] = {"brief": 20, "detail": 50}
MAX_OPTION_WORDS = 10
MAX_OPTION_CHARS = 120
MAX_EXPLANATION_CHARS = 1200


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewriteRequest:
    """What one ASD row needs from a rewriter.

    `question` is the original question without its native response-format instruction and
    `correct` the correct answer as content (a ScienceQA letter resolved to its option text, a
    grounding box as its string), so a rewriter never has to know the native format.
    """

    id: str
    record: InstructionRecord
    task_key: str
    style: str
    question: str
    correct: str
    n_distractors: int
    explanation: bool

    @property
    def needs_rewriter(self) -> bool:
        return self.n_distractors > 0 or self.explanation


@dataclass(frozen=True)
class Material:
    """A rewriter's answer for one request; `raw_text` is what the backend produced, kept for rejects."""

    distractors: tuple[str, ...] = ()
    explanation: str = ""
    raw_text: str = ""


@dataclass(frozen=True)
class Rejection:
    reason: str
    raw_text: str = ""


Outcome = Material | Rejection


class Rewriter(Protocol):
    name: str

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes what this backend writes (part of ASD's shard cache key)."""
        ...

    def rewrite(self, requests: Sequence[RewriteRequest], image_root: Path) -> list[Outcome]:
        """One outcome per request, in order. Raises `RewriterUnavailable` if the backend is down."""
        ...


class RewriterError(RuntimeError):
    """The rewriter cannot work as configured (wrong URL, refused credentials)."""


class RewriterUnavailable(RewriterError):
    """The server did not answer within the retry budget."""


# --------------------------------------------------------------------------------------------
# Validation of a rewriter's answer
# --------------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    box = parse_box(text)
    if box is not None:
        return format_box([round(v, 2) for v in box])
    return re.sub(r"[\s.,;:!?'\"`]+", " ", text.lower()).strip()


def _box_ok(text: str) -> bool:
    b = parse_box(text)
    return b is not None and all(0.0 <= v <= 1.0 for v in b) and b[0] < b[2] and b[1] < b[3]


def validate_material(req: RewriteRequest, m: Material) -> str | None:
    """Why `m` cannot be used for `req`, or None. Checks count, emptiness, length bounds,
    duplicates, the correct answer not among the distractors, and box syntax for box answers."""
    d = [x.strip() for x in m.distractors]
    if len(d) != req.n_distractors:
        return f"expected {req.n_distractors} distractor(s), got {len(d)}"
    correct_is_box = parse_box(req.correct) is not None
    for x in d:
        if not x:
            return "empty distractor"
        if "\n" in x or len(x) > MAX_OPTION_CHARS or len(x.split()) > MAX_OPTION_WORDS:
            return f"distractor too long or multi-line: {x[:60]!r}"
        if correct_is_box and not _box_ok(x):
            return f"distractor is not a valid box [x1, y1, x2, y2] in [0, 1]: {x[:60]!r}"
        if not correct_is_box and parse_box(x) is not None:
            return f"distractor is a box but the answer is not: {x[:60]!r}"
    normed = [_norm(x) for x in d]
    if _norm(req.correct) in normed:
        return f"the correct answer {req.correct!r} is among the distractors"
    if len(set(normed)) != len(normed):
        return f"duplicate distractors: {d}"
    e = m.explanation.strip()
    if req.explanation:
        lo, hi = EXPLANATION_WORDS[req.style]
        n = len(e.split())
        if not lo <= n <= hi or len(e) > MAX_EXPLANATION_CHARS:
            return f"explanation has {n} words, outside [{lo}, {hi}] for {req.style}"
    return None  # an explanation nobody asked for is ignored, not a reason to drop good distractors


# --------------------------------------------------------------------------------------------
# The rules backend
# --------------------------------------------------------------------------------------------
# Word groups of MiniCoIN answers: a distractor comes from the group of the correct answer.
_GROUPS: tuple[tuple[str, ...], ...] = (
    tuple(COLORS),
    SHAPES,
    QUADRANTS,
    SIGN_WORDS,
    tuple(GENRES.values()),
    tuple(AUTHORS.values()),
    ("left", "right", "above", "below"),
    ("1", "2", "3", "4", "5", "6"),
    ("yes", "no"),
)
_FILLERS = (
    "The answer rests only on what can be seen in the picture and read in the question.",
    "Nothing else in the picture points to a different answer.",
    "A second look at the picture confirms this reading.",
    "The other possible answers do not fit what the picture shows.",
)


def _group_of(answer: str, question: str) -> tuple[str, ...] | None:
    a = answer.lower()
    for g in _GROUPS:
        if a in g:
            return g
    if a == "unanswerable":  # VizWiz mirror: the question says what a readable photo would give
        return tuple(COLORS) if "color" in question.lower() else SHAPES
    return None


def _phrase(o: dict[str, Any]) -> str:
    where = "in the middle" if o["quadrant"] == "center" else f"in the {o['quadrant']}"
    return f"a {o['color']} {o['shape']} {where}"


def _listing(objects: list[dict[str, Any]], where: bool = True) -> str:
    parts = [_phrase(o) if where else f"a {o['color']} {o['shape']}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _box_words(box: list[float]) -> str:
    x1, y1, x2, y2 = (f"{v:.2f}" for v in box)
    return f"Its box runs from {x1} to {x2} across and from {y1} to {y2} down, in normalised coordinates."


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class RulesRewriter:
    """Distractors and explanations without a model, from the record's own data and metadata.

    Explanations need scene metadata (MiniCoIN) or a `solution` / `explanation` text in `meta`
    (ScienceQA has one); a record without either is rejected with a reason naming the openai
    backend, never given a made-up explanation.
    """

    name = "rules"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}

    def rewrite(self, requests: Sequence[RewriteRequest], image_root: Path) -> list[Outcome]:
        return [self._one(r) for r in requests]

    def _one(self, req: RewriteRequest) -> Outcome:
        rng = np.random.default_rng(stable_seed("asd-rules", self.seed, req.id))
        meta = req.record.meta_dict
        distractors: list[str] = []
        if req.n_distractors:
            pool = self._candidates(req, meta, rng)
            if len(pool) < req.n_distractors:
                return Rejection(
                    f"rules: only {len(pool)} distractor candidate(s) for answer {req.correct!r}, "
                    f"{req.n_distractors} needed",
                    json.dumps({"candidates": pool}),
                )
            distractors = pool[: req.n_distractors]
        explanation = ""
        if req.explanation:
            sentences = self._facts(req, meta)
            if not sentences:
                return Rejection(
                    f"rules: record has no scene metadata or solution text to explain task "
                    f"{req.task_key!r} from; use the openai backend"
                )
            explanation = self._compose(req.style, sentences, meta, scene=not meta.get("unanswerable"))
        raw = json.dumps({"distractors": distractors, "explanation": explanation})
        return Material(tuple(distractors), explanation, raw)

    # -- distractors ------------------------------------------------------------------------
    def _candidates(self, req: RewriteRequest, meta: dict[str, Any], rng: np.random.Generator) -> list[str]:
        correct = req.correct.strip()
        if parse_box(correct) is not None:
            return self._boxes(correct, meta, rng)
        own: list[str] = []  # the record's own alternatives make the hardest distractors
        for key in ("options", "ocr_tokens", "classes"):
            own += [str(x) for x in meta.get(key, [])]
        for o in meta.get("objects", []):
            own += [o["shape"], o["color"]]
        group = _group_of(correct, req.question)
        if group is None and not meta.get("options"):
            return []
        if group is None:  # real ScienceQA: options are all there is
            first, rest = [x for x in own if x in meta["options"]], []
        else:
            first = [x for x in own if x in group]
            rest = list(group)
            if "unanswerable" in req.question.lower() and correct.lower() != "unanswerable":
                rest.append("unanswerable")
        out: list[str] = []
        seen = {_norm(correct)}
        for part in (first, rest):
            for i in rng.permutation(len(part)):
                x = part[int(i)]
                if _norm(x) not in seen:
                    seen.add(_norm(x))
                    out.append(x)
        return out

    def _boxes(self, correct: str, meta: dict[str, Any], rng: np.random.Generator) -> list[str]:
        """Other objects' boxes first, then the true box moved until it overlaps little (IoU < 0.3)."""
        true = parse_box(correct)
        assert true is not None
        out: list[list[float]] = []
        for o in meta.get("objects", []):
            b = [round(v, 2) for v in o["box"]]
            if _iou(b, true) < 0.3 and b not in out:
                out.append(b)
        w, h = true[2] - true[0], true[3] - true[1]
        for _ in range(200):
            if len(out) >= 6:
                break
            x1 = float(rng.uniform(0, 1 - w))
            y1 = float(rng.uniform(0, 1 - h))
            b = [round(x1, 2), round(y1, 2), round(x1 + w, 2), round(y1 + h, 2)]
            if b[2] <= 1 and b[3] <= 1 and _iou(b, true) < 0.3 and all(_iou(b, c) < 0.7 for c in out):
                out.append(b)
        return [format_box(b) for b in out]

    # -- explanations -----------------------------------------------------------------------
    def _facts(self, req: RewriteRequest, meta: dict[str, Any]) -> list[str]:
        """Sentences that say why the answer is right, most specific first."""
        for key in ("solution", "explanation"):
            if isinstance(meta.get(key), str) and meta[key].strip():
                return [s.strip() + "." for s in meta[key].split(".") if s.strip()]
        objs: list[dict[str, Any]] = meta.get("objects", [])
        a, q, k = req.correct, req.question.split("\n")[0], req.task_key
        facts: list[str] = []
        if k == "textvqa" and meta.get("signs"):
            signs = meta["signs"]
            hit = next((s for s in signs if s["word"] == a), signs[0])
            other = next(s for s in signs if s is not hit)
            facts += [
                f"The {hit['color']} sign on the {hit['side']} reads {hit['word']}.",
                f"The other sign, the {other['color']} one on the {other['side']}, reads {other['word']}.",
                f"The reference OCR tokens {meta['ocr_tokens'][0]} and {meta['ocr_tokens'][1]} "
                "match the words on the two signs.",
            ]
        elif k == "ocrvqa" and "genre" in meta:
            facts += [
                f"The cover of the book is {meta['cover_color']}, the colour of {meta['genre']} books.",
                f"The pictogram on the cover is a {meta['pictogram']}, the mark of the author {meta['author']}.",
            ]
            if a in ("yes", "no"):
                facts.append(f"So this book is a {meta['genre']} book.")
        elif k == "vizwiz" and objs:
            if meta.get("unanswerable"):
                facts += [
                    "The photo is very dark and badly blurred.",
                    "No colour or shape can be made out in it, so the question cannot be answered from it.",
                ]
            else:
                o = objs[0]
                facts += [
                    f"The photo shows {_phrase(o)}, filling most of the frame.",
                    f"Its colour is {o['color']} and its shape is a {o['shape']}.",
                ]
        elif k == "grounding" and objs:
            box = parse_box(a)
            t = next((o for o in objs if [round(v, 2) for v in o["box"]] == box), objs[0])
            facts += [f"The {t['color']} {t['shape']} is in the {t['quadrant']} of the image."]
            facts += [_box_words(t["box"])]
        elif k == "gqa" and len(objs) == 2:
            x, y = objs
            facts.append(
                f"The {x['shape']} is in the {x['quadrant']} and the {y['shape']} is in the {y['quadrant']}."
            )
            if a in ("left", "right"):
                facts.append(f"So the {x['shape']} is to the {a} of the {y['shape']}.")
            elif a in ("above", "below"):
                facts.append(f"So the {x['shape']} is {a} the {y['shape']}.")
            else:
                facts.append(f"The object next to the {y['shape']} is the {x['color']} {x['shape']}.")
        elif objs:
            if q.startswith("How many"):
                facts.append(f"There are {len(objs)} objects in the picture: {_listing(objs, where=False)}.")
            elif a in ("yes", "no"):
                asked = next((s for s in SHAPES if re.search(rf"\b{s}\b", q)), None)
                hit = next((o for o in objs if o["shape"] == asked), None)
                facts.append(
                    f"There is {_phrase(hit)} in the picture."
                    if hit
                    else f"The picture shows {_listing(objs, where=False)}, but no {asked}."
                )
            else:
                t = next((o for o in objs if a in (o["shape"], o["color"], o["quadrant"])), objs[0])
                if a == t["shape"]:
                    facts.append(f"The {t['color']} object in the picture is a {t['shape']}.")
                elif a == t["color"]:
                    facts.append(f"The {t['shape']} in the picture is {t['color']}.")
                else:
                    facts.append(f"The {t['shape']} appears in the {t['quadrant']} part of the picture.")
                if k == "imagenet":
                    others = [c for c in meta.get("classes", []) if c != t["shape"]][:2]
                    if len(others) == 2:
                        facts.append(
                            f"Its outline is that of a {t['shape']}, not a {others[0]} or a {others[1]}."
                        )
        return facts

    def _compose(self, style: str, facts: list[str], meta: dict[str, Any], scene: bool) -> str:
        """Sentences up to the style's target length: facts first, then the scene (unless the
        photo is unreadable: naming its objects would contradict the answer), then fillers."""
        lo, hi = EXPLANATION_WORDS[style]
        target = EXPLANATION_TARGET[style]
        extra: list[str] = []
        if style == "detail":
            objs = meta.get("objects", [])
            if objs and scene:
                extra.append(f"The whole picture shows {_listing(objs)}.")
            if "image_size" in meta:
                extra.append(f"The picture is {meta['image_size'][0]} pixels wide and tall.")
            extra += list(_FILLERS)
        out: list[str] = []
        for s in facts + extra:
            n = len(" ".join(out).split())
            if n >= target or n + len(s.split()) > hi:
                if n >= lo:
                    break
                continue
            out.append(s)
        return " ".join(out)


# --------------------------------------------------------------------------------------------
# Prompts (package data: sefe_core/prompts/<task_key>.txt, sections [system] and [user])
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    system: str
    user: str  # with {questions} and {output_format}

    def render(self, questions: str, output_format: str) -> str:
        return self.user.replace("{questions}", questions).replace("{output_format}", output_format)


def _prompt_text(name: str, prompt_dir: str | None) -> str:
    if prompt_dir is not None:
        path = Path(prompt_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found (asd.server.prompt_dir={prompt_dir})")
        return path.read_text()
    res = resources.files("sefe_core") / "prompts" / name
    if not res.is_file():
        raise FileNotFoundError(f"no shipped prompt {name!r} in sefe_core/prompts/")
    return res.read_text()


def load_prompt(task_key: str, prompt_dir: str | None = None) -> Prompt:
    """The [system] and [user] sections of `<task_key>.txt`."""
    text = _prompt_text(f"{task_key}.txt", prompt_dir)
    m = re.fullmatch(r"\s*\[system\]\n(.*?)\n\[user\]\n(.*)", text, re.DOTALL)
    if m is None or "{questions}" not in m.group(2):
        raise ValueError(
            f"prompt {task_key}.txt must have [system] and [user] sections, the user one with {{questions}}"
        )
    return Prompt(m.group(1).strip(), m.group(2).strip())


def output_format(prompt_dir: str | None = None) -> str:
    return _prompt_text("output_format.txt", prompt_dir).strip()


def question_list(requests: Sequence[RewriteRequest]) -> str:
    """The numbered question list of one request: question, correct answer, what to write."""
    lines = []
    for i, r in enumerate(requests, start=1):
        q = r.question.replace("\n", " / ")
        lines.append(f"{i}. Question: {q}")
        lines.append(f"   Correct answer: {r.correct}")
        lines.append(f"   Wrong answers to write: {r.n_distractors}")
        if r.explanation:
            lines.append(f"   Explanation to write: about {EXPLANATION_TARGET[r.style]} words")
        else:
            lines.append("   Explanation to write: none (empty string)")
    return "\n".join(lines)


def response_schema(n: int) -> dict[str, Any]:
    """JSON schema of one reply: exactly `n` numbered answers."""
    item = {
        "type": "object",
        "properties": {
            "number": {"type": "integer"},
            "wrong_answers": {"type": "array", "items": {"type": "string"}},
            "explanation": {"type": "string"},
        },
        "required": ["number", "wrong_answers", "explanation"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"answers": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
        "required": ["answers"],
        "additionalProperties": False,
    }


def parse_reply(text: str, n: int) -> list[Outcome]:
    """Turn one model reply into `n` outcomes. A reply that is not the asked JSON rejects every
    question of the request, with the raw text; a malformed single entry rejects only that one."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return [Rejection(f"model reply is not valid JSON ({e.msg})", text)] * n
    answers = obj.get("answers") if isinstance(obj, dict) else None
    if not isinstance(answers, list):
        return [Rejection("model reply JSON has no 'answers' list", text)] * n
    if len(answers) != n:
        return [Rejection(f"model reply has {len(answers)} answers for {n} questions", text)] * n
    numbers = [a.get("number") if isinstance(a, dict) else None for a in answers]
    if sorted(x for x in numbers if type(x) is int) != list(range(1, n + 1)):
        return [Rejection(f"model reply numbers answers {numbers}, expected 1..{n}", text)] * n
    out: list[Outcome] = [Rejection("unreachable", text)] * n
    for a in answers:
        wrong, expl = a.get("wrong_answers"), a.get("explanation")
        if not isinstance(wrong, list) or not all(isinstance(w, str) for w in wrong):
            out[a["number"] - 1] = Rejection("'wrong_answers' is not a list of strings", text)
        elif not isinstance(expl, str):
            out[a["number"] - 1] = Rejection("'explanation' is not a string", text)
        else:
            out[a["number"] - 1] = Material(tuple(wrong), expl, text)
    return out


# --------------------------------------------------------------------------------------------
# The openai backend
# --------------------------------------------------------------------------------------------
class ServerConfig(BaseModel):
    """How to reach an OpenAI-compatible chat server (vLLM, transformers serve, ...)."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = Field(None, description="the served model's name, as given to the server")
    api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the bearer token, if any")
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(4, ge=0, description="retries after the first attempt, exponential backoff")
    backoff_s: float = Field(1.0, ge=0)
    max_tokens_per_question: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    json_schema: bool = Field(True, description="request JSON through response_format json_schema")
    group_by_image: bool = Field(True, description="all questions of one image in one request")
    prompt_dir: str | None = Field(None, description="directory overriding the shipped prompt files")


_RETRY_STATUS = {429, 500, 502, 503, 504}
_FATAL_STATUS = {401, 403, 404}


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _first_error(eg: BaseExceptionGroup) -> BaseException:
    """The error a caller should see from a TaskGroup: a RewriterError if there is one."""
    flat: list[BaseException] = []
    stack: list[BaseException] = [eg]
    while stack:
        e = stack.pop(0)
        stack.extend(e.exceptions) if isinstance(e, BaseExceptionGroup) else flat.append(e)
    return next((e for e in flat if isinstance(e, RewriterError)), flat[0])


def _run_coroutine(coro: Any) -> Any:
    """asyncio.run, also from inside a running loop (a notebook): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


@dataclass
class OpenAIRewriter:
    """Rewriter over an OpenAI-compatible `POST {base_url}/chat/completions`.

    `transport` lets tests put an `httpx.MockTransport` in place of the network; `stats` counts
    the HTTP requests made (the benchmark reads it).
    """

    server: ServerConfig
    transport: httpx.AsyncBaseTransport | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "retries": 0})
    name: str = "openai"

    def __post_init__(self) -> None:
        if not self.server.model:
            raise RewriterError(
                "asd.server.model must name the served model, as given to the server "
                "(e.g. the id passed to `vllm serve`)"
            )

    def fingerprint(self) -> dict[str, Any]:
        s = self.server
        keys = sorted({"output_format"} | set(SCORERS))
        prompts = hashlib.sha256()
        for k in keys:
            try:
                prompts.update(_prompt_text(f"{k}.txt", s.prompt_dir).encode())
            except FileNotFoundError:
                prompts.update(b"-")
        return {
            "name": self.name,
            "model": s.model,
            "max_tokens_per_question": s.max_tokens_per_question,
            "temperature": s.temperature,
            "json_schema": s.json_schema,
            "group_by_image": s.group_by_image,
            "prompts": config_hash(prompts.hexdigest()),
        }

    def rewrite(self, requests: Sequence[RewriteRequest], image_root: Path) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(requests)
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            if not r.needs_rewriter:  # nothing to write: rules alone build this row
                out[i] = Material()
            else:
                key = (r.task_key, r.record.image) if self.server.group_by_image else i
                groups.setdefault(key, []).append(i)
        results = _run_coroutine(self._all([[requests[i] for i in g] for g in groups.values()], image_root))
        for g, res in zip(groups.values(), results, strict=True):
            for i, o in zip(g, res, strict=True):
                out[i] = o
        assert all(o is not None for o in out)
        return out  # type: ignore[return-value]

    async def _all(self, groups: list[list[RewriteRequest]], image_root: Path) -> list[list[Outcome]]:
        sem = asyncio.Semaphore(self.server.concurrency)
        timeout = httpx.Timeout(self.server.timeout_s)
        limits = httpx.Limits(max_connections=self.server.concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=self.transport) as client:

            async def one(g: list[RewriteRequest]) -> list[Outcome]:
                async with sem:
                    return await self._request(client, g, image_root)

            try:
                async with asyncio.TaskGroup() as tg:  # one failure cancels the siblings
                    tasks = [tg.create_task(one(g)) for g in groups]
            except BaseExceptionGroup as eg:
                raise _first_error(eg) from None
        return [t.result() for t in tasks]

    def payload(self, group: Sequence[RewriteRequest], image_root: Path) -> dict[str, Any]:
        s = self.server
        prompt = load_prompt(group[0].task_key, s.prompt_dir)
        text = prompt.render(question_list(group), output_format(s.prompt_dir))
        image = image_root / group[0].record.image
        body: dict[str, Any] = {
            "model": s.model,
            "messages": [
                {"role": "system", "content": prompt.system},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_uri(image)}},
                        {"type": "text", "text": text},
                    ],
                },
            ],
            "max_tokens": s.max_tokens_per_question * len(group),
            "temperature": s.temperature,
        }
        if s.json_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "asd_answers", "schema": response_schema(len(group)), "strict": True},
            }
        return body

    async def _request(
        self, client: httpx.AsyncClient, group: list[RewriteRequest], image_root: Path
    ) -> list[Outcome]:
        s = self.server
        url = s.base_url.rstrip("/") + "/chat/completions"
        headers = {}
        if os.environ.get(s.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[s.api_key_env]}"
        body = self.payload(group, image_root)
        last = ""
        for attempt in range(s.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(s.backoff_s * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            try:
                resp = await client.post(url, json=body, headers=headers)
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if resp.status_code in _RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code in _FATAL_STATUS:
                raise RewriterError(
                    f"server {url} answered HTTP {resp.status_code} ({resp.text[:200]}); "
                    "check asd.server.base_url / model / api_key_env"
                )
            if resp.status_code != 200:  # this request is refused, the server is fine
                return [Rejection(f"server refused the request: HTTP {resp.status_code}", resp.text)] * len(
                    group
                )
            try:
                content = resp.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return [Rejection("server reply is not a chat completion", resp.text)] * len(group)
            if not isinstance(content, str):
                return [Rejection("server reply has no text content", resp.text)] * len(group)
            return parse_reply(content, len(group))
        raise RewriterUnavailable(
            f"rewriter server {url} (model {s.model}) did not answer after {s.retries + 1} attempt(s) "
            f"with {s.timeout_s:g} s timeout: {last}"
        )


def make_rewriter(backend: str, seed: int, server: ServerConfig) -> Rewriter:
    if backend == "rules":
        return RulesRewriter(seed)
    if backend == "openai":
        return OpenAIRewriter(server)
    raise ValueError(f"unknown ASD backend {backend!r}; known: rules, openai")
