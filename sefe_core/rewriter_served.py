"""The `openai` ASD backend: a served rewriter model (vLLM, `transformers serve`, any
OpenAI-compatible chat server). All questions of one image go in one request, the image as a data
URI, JSON requested through `response_format` json_schema; requests run concurrently and are
retried with exponential backoff on connection errors / 5xx / 429; a server that stays down ends
in `RewriterUnavailable`. Its prompts are the task kinds' `prompt.txt` files."""

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
from typing import Any

import httpx

from sefe_core.hashing import config_hash
from sefe_core.kinds import KINDS
from sefe_core.rewriter import (
    EXPLANATION_TARGET,
    Material,
    Outcome,
    Rejection,
    RewriteRequest,
    RewriterError,
    RewriterUnavailable,
    ServerConfig,
)


# --------------------------------------------------------------------------------------------
# Prompts (package data: sefe_core/kinds/<kind>/prompt.txt, sections [system] and [user]; a
# `prompt_dir` holds <kind>.txt files instead)
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
    # shipped: a task kind's prompt beside its unit (sefe_core/kinds/<kind>/prompt.txt), the
    # shared output format in sefe_core/prompts/
    stem = name.removesuffix(".txt")
    res = resources.files("sefe_core") / ("kinds" if stem in KINDS else "prompts")
    res = res / stem / "prompt.txt" if stem in KINDS else res / name
    if not res.is_file():
        raise FileNotFoundError(
            f"no shipped prompt {name!r} (sefe_core/kinds/<kind>/prompt.txt, sefe_core/prompts/)"
        )
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
        return [Rejection(f"model reply is not valid JSON ({e.msg})", text, retryable=True)] * n
    answers = obj.get("answers") if isinstance(obj, dict) else None
    if not isinstance(answers, list):
        return [Rejection("model reply JSON has no 'answers' list", text, retryable=True)] * n
    if len(answers) != n:
        return [
            Rejection(f"model reply has {len(answers)} answers for {n} questions", text, retryable=True)
        ] * n
    numbers = [a.get("number") if isinstance(a, dict) else None for a in answers]
    if sorted(x for x in numbers if type(x) is int) != list(range(1, n + 1)):
        return [
            Rejection(f"model reply numbers answers {numbers}, expected 1..{n}", text, retryable=True)
        ] * n
    out: list[Outcome] = [Rejection("unreachable", text)] * n
    for a in answers:
        wrong, expl = a.get("wrong_answers"), a.get("explanation")
        if not isinstance(wrong, list) or not all(isinstance(w, str) for w in wrong):
            out[a["number"] - 1] = Rejection("'wrong_answers' is not a list of strings", text, retryable=True)
        elif not isinstance(expl, str):
            out[a["number"] - 1] = Rejection("'explanation' is not a string", text, retryable=True)
        else:
            out[a["number"] - 1] = Material(tuple(wrong), expl, text)
    return out


# --------------------------------------------------------------------------------------------
# The openai backend
# --------------------------------------------------------------------------------------------
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
        keys = sorted({"output_format"} | set(KINDS))
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
        n = len(group)
        last = ""
        for attempt in range(s.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(s.backoff_s * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            try:
                async with asyncio.timeout(s.timeout_s):  # the whole attempt, not each read
                    status, text = await self._post(client, url, body, headers)
            except httpx.TransportError as e:  # connection refused/reset, per-read timeouts
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            except TimeoutError:
                last = f"no complete reply within timeout_s={s.timeout_s:g} s"
                continue
            except _TooLarge as e:
                reason = f"server reply is larger than asd.server.max_response_bytes={s.max_response_bytes}"
                return [Rejection(reason, e.head, retryable=True)] * n
            if status in _RETRY_STATUS:
                last = f"HTTP {status}: {text[:200]}"
                continue
            if status in _FATAL_STATUS:
                raise RewriterError(
                    f"server {url} answered HTTP {status} ({text[:200]}); "
                    "check asd.server.base_url / model / api_key_env"
                )
            if status != 200:  # this request is refused, the server is fine
                return [Rejection(f"server refused the request: HTTP {status}", text, retryable=True)] * n
            try:
                content = json.loads(text)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return [Rejection("server reply is not a chat completion", text, retryable=True)] * n
            if not isinstance(content, str):
                return [Rejection("server reply has no text content", text, retryable=True)] * n
            return parse_reply(content, n)
        raise RewriterUnavailable(
            f"rewriter server {url} (model {s.model}) did not answer after {s.retries + 1} attempt(s) "
            f"with {s.timeout_s:g} s timeout: {last}"
        )

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, str]:
        """(status, text) of one POST, read as a stream so that a huge reply stops at the cap
        instead of being held whole."""
        cap = self.server.max_response_bytes
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                chunks.append(chunk)
                if size > cap:
                    raise _TooLarge(b"".join(chunks)[:2000].decode("utf-8", "replace"))
            return resp.status_code, b"".join(chunks).decode("utf-8", "replace")


class _TooLarge(Exception):
    def __init__(self, head: str):
        self.head = head  # the reply's start, kept with the rejects
