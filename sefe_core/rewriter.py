"""ASD rewriter backends: given original records, return the material each requested answer style
needs (distractors, an explanation), or a rejection with its reason and the raw text seen.

Two backends share one interface (`Rewriter.rewrite`), one module each:

- `rules` (no model, `rewriter_rules.py`): distractors and explanations from what the data already holds (existing
  options, other class names, the other OCR token, perturbed boxes, MiniCoIN scene metadata).
- `openai` (`rewriter_served.py`): any OpenAI-compatible chat server (`vllm serve ...`, `transformers serve ...`). All
  questions of one image go in one request, the image as a data URI, JSON requested through
  `response_format` json_schema; requests run concurrently, are retried with exponential backoff
  on connection errors / 5xx / 429, and a server that stays down ends in `RewriterUnavailable`
  (one that refuses every time, in `RewriterRefused`).
  Its prompts are ours (one per task kind) or, with `prompt_dir` at the reference's prompt
  folder, the reference's (one per task and style, each with its own reply shape).

Whatever a backend returns is checked by `validate_material` before ASD uses it: a model's answer
is data only once its shape, count, bounds and distinctness have been verified.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from data_contracts import InstructionRecord
from sefe_core.scenes import (
    format_box,
)
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
    """No usable material for one request. `retryable`: the reply itself was unusable (server
    error, not the asked JSON), so the same request may well succeed later; a well-formed reply
    that fails validation, or a rule that has nothing to work with, is not."""

    reason: str
    raw_text: str = ""
    retryable: bool = False


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


class RewriterRefused(RewriterError):
    """The server is up but refuses the requests the same way every time (a schema it cannot
    follow, an unknown model, prompts over its context, a crash on every request): retrying
    will not help, the configuration must change. The message carries the server's own."""


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


class LaunchConfig(BaseModel):
    """How to start the rewriter server when nothing answers at `base_url`."""

    model_config = ConfigDict(extra="forbid")
    command: list[str] | str = Field(
        description="the server's command line (a list, or one string split like a shell would); "
        "{host} and {port} are replaced by those of asd.server.base_url, e.g. "
        "'/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server --model M --port {port}'"
    )
    env: dict[str, str] = Field(default_factory=dict, description="added to this process's environment")
    startup_timeout_s: float = Field(
        900.0, gt=0, description="how long to wait for /health and /v1/models (a 26B model loads for minutes)"
    )
    log_file: str | None = Field(None, description="server output; default <run>/data/rewriter-server.log")

    def argv(self, base_url: str) -> list[str]:
        parts = urlsplit(base_url)
        host, port = (
            parts.hostname or "127.0.0.1",
            str(parts.port or (443 if parts.scheme == "https" else 80)),
        )
        words = shlex.split(self.command) if isinstance(self.command, str) else list(self.command)
        if not words:
            raise ValueError("asd.server.launch.command is empty")
        return [w.replace("{host}", host).replace("{port}", port) for w in words]


class ServerConfig(BaseModel):
    """How to reach an OpenAI-compatible chat server (vLLM, transformers serve, ...)."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = Field(None, description="the served model's name, as given to the server")
    api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the bearer token, if any")
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(
        120.0,
        gt=0,
        description="the most one attempt may take, connect to last byte (a server that "
        "drips its reply is cut off here, then retried)",
    )
    max_response_bytes: int = Field(
        4_000_000, ge=1024, description="a larger reply is rejected (retryable) as soon as it passes this"
    )
    retries: int = Field(4, ge=0, description="retries after the first attempt, exponential backoff")
    backoff_s: float = Field(1.0, ge=0)
    max_tokens_per_question: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    json_schema: bool = Field(True, description="request JSON through response_format json_schema")
    group_by_image: bool = Field(True, description="all questions of one image in one request")
    prompt_dir: str | None = Field(
        None,
        description="directory overriding the shipped prompts: <kind>.txt files and output_format.txt "
        "(our layout), or the reference's prompt folder as it is in its repository "
        "(CoIN-ASD/prompts/<Task>/<style>.txt, or a checkout holding it)",
    )
    launch: LaunchConfig | None = Field(
        None,
        description="start the server ASD needs (and stop it after): its command; None: the user runs it "
        "(sefe_core/rewriter_server.py)",
    )


def make_rewriter(backend: str, seed: int, server: ServerConfig) -> Rewriter:
    if backend == "rules":
        from sefe_core.rewriter_rules import RulesRewriter

        return RulesRewriter(seed)
    if backend == "openai":
        from sefe_core.rewriter_served import OpenAIRewriter

        return OpenAIRewriter(server)
    raise ValueError(f"unknown ASD backend {backend!r}; known: rules, openai")
