"""The `openai` ASD backend: a served rewriter model (vLLM, `transformers serve`, any
OpenAI-compatible chat server). All questions of one image go in one request, the image as a data
URI, JSON requested through `response_format` json_schema; requests run concurrently and are
retried with exponential backoff on connection errors / 5xx / 429; a server that stays down ends
in `RewriterUnavailable`, one that refuses the same way every time in `RewriterRefused` with its
own message. Its prompts are the task kinds' `prompt.txt` files, or the `<kind>.txt`
files of `asd.server.prompt_dir`, or, with `prompt_dir` at the reference implementation's prompt
folder (jinpeng0528/SEFE `CoIN-ASD/prompts/<Task>/<style>.txt`, used where it lies, not copied),
the reference's: one prompt per task and style, each asking for its own JSON shape, mapped here
onto the same `Material` (distractors, explanation) so validation and assembly do not change."""

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
    RewriterRefused,
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


def response_schema(group: Sequence[RewriteRequest]) -> dict[str, Any]:
    """JSON schema of one reply: exactly one numbered answer per request, numbered 1..n, with as
    many wrong answers as the group's questions ask for (a grammar-constrained server cannot then
    write `"number": 74` or an endless list; string lengths are left to validation, which states
    them in its reject reasons)."""
    n = len(group)
    wrong = [r.n_distractors for r in group]
    item = {
        "type": "object",
        "properties": {
            "number": {"type": "integer", "minimum": 1, "maximum": n},
            "wrong_answers": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": min(wrong),
                "maxItems": max(wrong),
            },
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
# Prompts in the reference's layout: <root>/<Task>/<style>.txt with <Task> a CoIN task folder
# (ScienceQA, TextVQA, ...) and <style> yn, mcq, brief or detail; ScienceQA's are split into
# <style>_w_image.txt and <style>_wo_image.txt. Sections <SYSTEM PROMPT> and <USER PROMPT>. The
# placeholders say how requests are grouped: <question_list> (every question of one image:
# GQA, VQAv2, OCRVQA) and <target_list> (Grounding's regions) take all rows of one image and
# style; <question>, <answer>, <gt_category> (ScienceQA, TextVQA, VizWiz, ImageNet) one row.
# --------------------------------------------------------------------------------------------
REFERENCE_STYLE_FILES = {"yes_no": "yn", "mcq": "mcq", "brief": "brief", "detail": "detail"}
LIST_PLACEHOLDERS = ("question_list", "target_list")
ROW_PLACEHOLDERS = ("question", "answer", "gt_category")
# the JSON field that carries each style's material in the reference's replies
REFERENCE_FIELDS = {
    "yes_no": "distractor_option",
    "mcq": "distractor_options",
    "brief": "explanation",
    "detail": "explanation",
}
_PLACEHOLDER = re.compile(r"<([a-z_]+)>")


def reference_root(prompt_dir: str | Path) -> Path | None:
    """The folder in the reference's layout that `prompt_dir` is, or holds as `CoIN-ASD/prompts`
    (a checkout of the reference), or None: a subfolder named like a CoIN task with .txt files."""
    tasks = [k.coin_name for k in KINDS.values()]
    for root in (Path(prompt_dir), Path(prompt_dir) / "CoIN-ASD" / "prompts"):
        if any((root / t).is_dir() and any((root / t).glob("*.txt")) for t in tasks):
            return root
    return None


@dataclass(frozen=True)
class ReferencePrompt:
    """One prompt file of the reference's layout. `listed`: the list placeholder its user section
    holds (all rows of one image in one request), or None (one request per row)."""

    path: Path
    system: str
    user: str
    listed: str | None

    def render(self, group: Sequence[RewriteRequest]) -> str:
        if self.listed is None:
            (r,) = group
            values = {"question": r.question, "answer": r.correct, "gt_category": r.correct}
            return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), self.user)
        if self.listed == "target_list":
            items = [f"{i}. {_expression(r)}: {r.correct}" for i, r in enumerate(group, start=1)]
        else:
            items = [
                f"{i}. Question: {r.question.replace(chr(10), ' / ')}\n   Answer: {r.correct}"
                for i, r in enumerate(group, start=1)
            ]
        return self.user.replace(f"<{self.listed}>", "\n".join(items))

    def field(self, style: str) -> str:
        """The reply's field for `style` (Grounding's list asks for a `description`)."""
        if self.listed == "target_list" and style in ("brief", "detail"):
            return "description"
        return REFERENCE_FIELDS[style]


def _expression(r: RewriteRequest) -> str:
    from sefe_core.asd import grounding_expression  # asd imports this module's package first

    return grounding_expression(r.record)


def load_reference_prompt(path: Path) -> ReferencePrompt:
    """Parse one prompt file of the reference's layout; a malformed one is a `RewriterError`."""
    m = re.match(r"\s*<SYSTEM PROMPT>(.*?)<USER PROMPT>(.*)", path.read_text(), re.DOTALL)
    if m is None:
        raise RewriterError(f"prompt {path} must have a <SYSTEM PROMPT> section, then a <USER PROMPT> one")
    system, user = m.group(1).strip(), m.group(2).strip()
    found = set(_PLACEHOLDER.findall(user)) - {"image"}
    unknown = found - {*LIST_PLACEHOLDERS, *ROW_PLACEHOLDERS}
    listed = [p for p in LIST_PLACEHOLDERS if p in found]
    known = ", ".join(f"<{p}>" for p in (*LIST_PLACEHOLDERS, *ROW_PLACEHOLDERS))
    if unknown or not found or len(listed) > 1 or (listed and found & set(ROW_PLACEHOLDERS)):
        raise RewriterError(
            f"prompt {path}: its <USER PROMPT> holds the placeholders {sorted(found)}; it needs one "
            f"list (<question_list> or <target_list>) or row placeholders (<question>, <answer>, "
            f"<gt_category>), not both; known: {known}"
        )
    return ReferencePrompt(path, system, user, listed[0] if listed else None)


def reference_schema(prompt: ReferencePrompt, style: str, n: int) -> dict[str, Any]:
    """JSON schema of a reply to `prompt`, in the shape the reference's prompt files ask for."""
    string: dict[str, Any] = {"type": "string"}
    value = {"type": "array", "items": string} if style == "mcq" else string
    props: dict[str, Any]
    index = {"type": "integer", "minimum": 1, "maximum": n}
    if prompt.listed == "target_list":
        props = {"target_index": index, prompt.field(style): value}
    elif prompt.listed == "question_list":
        echo = "correct_answer" if style in ("yes_no", "mcq") else "answer"
        props = {"question_index": index, "question": string, echo: string}
        props[prompt.field(style)] = value
    else:
        props = {"gt_category": string} if "<gt_category>" in prompt.user else {}
        props[prompt.field(style)] = value
    item = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return {"type": "array", "items": item, "minItems": n, "maxItems": n} if prompt.listed else item


def _lenient_json(text: str) -> Any:
    """JSON of a reply, from inside a ```json fence if there is one; failing that, once more
    without // comment lines and trailing commas (the reference's examples have both)."""
    body = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        first = e
    cleaned = re.sub(r",(\s*[}\]])", r"\1", re.sub(r"^\s*//.*$", "", body, flags=re.MULTILINE))
    try:
        return json.loads(cleaned)
    except json.JSONDecodeError:
        raise ValueError(first.msg) from None


def _reference_material(entry: dict[str, Any], field: str, style: str, raw: str) -> Outcome:
    v = entry.get(field)
    if style == "mcq":
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return Material(tuple(v), "", raw)
        return Rejection(f"'{field}' is not a list of strings", raw, retryable=True)
    if not isinstance(v, str):
        return Rejection(f"'{field}' is not a string", raw, retryable=True)
    return Material((v,), "", raw) if style == "yes_no" else Material((), v, raw)


def parse_reference_reply(text: str, prompt: ReferencePrompt, style: str, n: int) -> list[Outcome]:
    """`n` outcomes from a reply to a reference-layout prompt: one JSON object for a row prompt,
    a list of `n` entries numbered 1..n (question_index / target_index) for a list prompt."""
    field = prompt.field(style)
    try:
        obj = _lenient_json(text)
    except ValueError as e:
        return [Rejection(f"model reply is not valid JSON ({e})", text, retryable=True)] * n
    if prompt.listed is None:
        if isinstance(obj, list) and len(obj) == 1:
            obj = obj[0]
        if not isinstance(obj, dict):
            return [Rejection("model reply JSON is not an object", text, retryable=True)] * n
        return [_reference_material(obj, field, style, text)]
    if isinstance(obj, dict):  # the list wrapped in an object
        lists = [v for v in obj.values() if isinstance(v, list)]
        obj = lists[0] if len(lists) == 1 else obj
    if not isinstance(obj, list):
        return [Rejection("model reply JSON is not a list", text, retryable=True)] * n
    if len(obj) != n:
        return [Rejection(f"model reply has {len(obj)} entries for {n} questions", text, retryable=True)] * n
    key = "target_index" if prompt.listed == "target_list" else "question_index"
    numbers = [e.get(key) if isinstance(e, dict) else None for e in obj]
    if sorted(x for x in numbers if type(x) is int) != list(range(1, n + 1)):
        reason = f"model reply numbers its entries {numbers} ({key}), expected 1..{n}"
        return [Rejection(reason, text, retryable=True)] * n
    out: list[Outcome] = [Rejection("unreachable", text)] * n
    for e in obj:
        out[e[key] - 1] = _reference_material(e, field, style, text)
    return out


def _binary_mcq(r: RewriteRequest) -> Material | None:
    """A yes/no question's two-option mcq needs no model: its one distractor is the other answer
    (the reference's mcq prompts always ask for three)."""
    c = r.correct.strip()
    if r.style != "mcq" or r.n_distractors != 1 or c.lower() not in ("yes", "no"):
        return None
    other = "no" if c.lower() == "yes" else "yes"
    return Material((other.capitalize() if c[:1].isupper() else other,))


# --------------------------------------------------------------------------------------------
# The openai backend
# --------------------------------------------------------------------------------------------
REFUSED = "server refused the request"


def server_message(text: str, limit: int = 300) -> str:
    """The server's own words from an error body: OpenAI's {"error": {"message"}}, FastAPI's
    {"detail"}, a {"message"}, else the text itself; one line, at most `limit` characters."""
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        found = err.get("message") if isinstance(err, dict) else err
        found = found or obj.get("detail") or obj.get("message")
        if found:
            text = found if isinstance(found, str) else json.dumps(found)
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
    # the reference-layout prompt folder `server.prompt_dir` is (or holds), None for our layout
    reference: Path | None = field(default=None, init=False)
    _loaded: dict[Path, ReferencePrompt] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.server.model:
            raise RewriterError(
                "asd.server.model must name the served model, as given to the server "
                "(e.g. the id passed to `vllm serve`)"
            )
        d = self.server.prompt_dir
        if d is None:
            return
        if not Path(d).is_dir():
            raise RewriterError(f"asd.server.prompt_dir={d} is not a directory")
        self.reference = reference_root(d)
        ours = [f"{k}.txt" for k in ("output_format", *KINDS)]
        if self.reference is None and not any((Path(d) / n).is_file() for n in ours):
            raise RewriterError(
                f"asd.server.prompt_dir={d} holds no prompts: neither our layout (files "
                f"{', '.join(ours)}) nor the reference's (folders {', '.join(k.coin_name for k in KINDS.values())} "
                "of <style>.txt files, as in CoIN-ASD/prompts of jinpeng0528/SEFE)"
            )

    def fingerprint(self) -> dict[str, Any]:
        s = self.server
        keys = sorted({"output_format"} | set(KINDS))
        prompts = hashlib.sha256()
        if self.reference is not None:  # every file of the folder, by its place in it
            for path in sorted(self.reference.rglob("*.txt")):
                prompts.update(
                    f"{path.relative_to(self.reference).as_posix()}\0".encode() + path.read_bytes()
                )
        else:
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

    def reference_prompt(self, r: RewriteRequest) -> ReferencePrompt:
        """The reference-layout prompt of a request: <Task>/<style>.txt, or ScienceQA's
        <style>_w_image.txt / <style>_wo_image.txt by whether the row has an image."""
        assert self.reference is not None
        folder = self.reference / KINDS[r.task_key].coin_name
        stem = REFERENCE_STYLE_FILES.get(r.style)
        variant = f"{stem}_{'w' if r.record.image else 'wo'}_image.txt"
        for path in (folder / variant, folder / f"{stem}.txt") if stem else ():
            if path.is_file():
                if path not in self._loaded:
                    self._loaded[path] = load_reference_prompt(path)
                return self._loaded[path]
        raise RewriterError(
            f"no prompt for the {r.style} rows of task kind {r.task_key}: {folder / f'{stem}.txt'} "
            f"(or {variant}) not found in asd.server.prompt_dir={self.server.prompt_dir} (the "
            "reference's layout). The reference has prompts for some styles of each task only; "
            "asd.recipe=reference converts each task into those alone."
            if stem
            else f"the reference's layout has no prompts for {r.style} rows (task kind {r.task_key}, "
            f"asd.server.prompt_dir={self.server.prompt_dir}); use asd.recipe=reference"
        )

    def check(self, requests: Sequence[RewriteRequest]) -> None:
        """Raise `RewriterError` if a request needs a prompt this configuration lacks or cannot
        parse (run_asd calls it before the first request is sent)."""
        needed = [r for r in requests if r.needs_rewriter]
        if self.reference is not None:
            for r in needed:
                if _binary_mcq(r) is None:
                    self.reference_prompt(r)
            return
        try:
            for task_key in sorted({r.task_key for r in needed}):
                load_prompt(task_key, self.server.prompt_dir)
            if needed:
                output_format(self.server.prompt_dir)
        except (FileNotFoundError, ValueError) as e:
            raise RewriterError(str(e)) from None

    def rewrite(self, requests: Sequence[RewriteRequest], image_root: Path) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(requests)
        groups: dict[Any, list[int]] = {}
        together = self.server.group_by_image
        for i, r in enumerate(requests):
            local = _binary_mcq(r) if self.reference is not None else None
            if not r.needs_rewriter:  # nothing to write: rules alone build this row
                out[i] = Material()
            elif local is not None:
                out[i] = local
            elif self.reference is not None:  # a list prompt takes the rows of one image and style
                prompt = self.reference_prompt(r)
                key = (prompt.path, r.record.image) if together and prompt.listed and r.record.image else i
                groups.setdefault(key, []).append(i)
            else:
                key = (r.task_key, r.record.image) if together and r.record.image else i
                groups.setdefault(key, []).append(i)
        results = _run_coroutine(self._all([[requests[i] for i in g] for g in groups.values()], image_root))
        refused = [
            res[0].reason
            for res in results
            if isinstance(res[0], Rejection) and res[0].reason.startswith(REFUSED)
        ]
        if len(results) > 1 and len(refused) == len(results):  # the same refusal for everything
            raise RewriterRefused(
                f"rewriter server {self.server.base_url} refused all {len(results)} requests of this "
                f"shard; the first: {refused[0].removeprefix(REFUSED + ': ')}. Nothing of the shard is "
                "saved; fix the server or asd.server settings and run again"
            )
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
        if self.reference is not None:
            ref = self.reference_prompt(group[0])
            system, text = ref.system, ref.render(group)
            name, schema = "asd_reference", reference_schema(ref, group[0].style, len(group))
        else:
            prompt = load_prompt(group[0].task_key, s.prompt_dir)
            system, text = prompt.system, prompt.render(question_list(group), output_format(s.prompt_dir))
            name, schema = "asd_answers", response_schema(group)
        content: list[dict[str, Any]] = []
        if group[0].record.image:  # a text-only question goes without an image
            url = _data_uri(image_root / group[0].record.image)
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": text})
        messages = [{"role": "system", "content": system}] if system else []
        body: dict[str, Any] = {
            "model": s.model,
            "messages": [*messages, {"role": "user", "content": content}],
            "max_tokens": s.max_tokens_per_question * len(group),
            "temperature": s.temperature,
        }
        if s.json_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            }
        return body

    def parse(self, group: Sequence[RewriteRequest], content: str) -> list[Outcome]:
        """The outcomes of one reply, in the shape its prompt asked for."""
        if self.reference is None:
            return parse_reply(content, len(group))
        return parse_reference_reply(content, self.reference_prompt(group[0]), group[0].style, len(group))

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
        answered: tuple[int, str] | None = None  # the last attempt's HTTP status and message
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
                answered = None
                continue
            except TimeoutError:
                last = f"no complete reply within timeout_s={s.timeout_s:g} s"
                answered = None
                continue
            except _TooLarge as e:
                reason = f"server reply is larger than asd.server.max_response_bytes={s.max_response_bytes}"
                return [Rejection(reason, e.head, retryable=True)] * n
            if status in _RETRY_STATUS:
                last = f"HTTP {status}: {server_message(text)}"
                # a 500 is the server itself failing this request; 429 and 502-504 say it is
                # busy or not behind its proxy yet: unavailable, worth a later retry
                answered = (status, server_message(text)) if status == 500 else None
                continue
            if status in _FATAL_STATUS:
                raise RewriterRefused(
                    f"server {url} answered HTTP {status}: {server_message(text)}; "
                    "check asd.server.base_url / model / api_key_env"
                )
            if status != 200:  # this request is refused (e.g. its prompt is over the context)
                reason = f"{REFUSED}: HTTP {status}: {server_message(text)}"
                return [Rejection(reason, text, retryable=True)] * n
            try:
                choice = json.loads(text)["choices"][0]
                content = choice["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return [Rejection("server reply is not a chat completion", text, retryable=True)] * n
            if not isinstance(content, str):
                return [Rejection("server reply has no text content", text, retryable=True)] * n
            outcomes = self.parse(group, content)
            if choice.get("finish_reason") == "length":  # say that it stopped at the limit
                cut = (
                    f"; the reply stopped at the token limit (finish_reason=length, max_tokens "
                    f"{body['max_tokens']}): if it was cut mid-answer, raise "
                    "asd.server.max_tokens_per_question or the server's context (vLLM --max-model-len)"
                )
                outcomes = [
                    Rejection(o.reason + cut, o.raw_text, o.retryable) if isinstance(o, Rejection) else o
                    for o in outcomes
                ]
            return outcomes
        if answered is not None:  # the server is up and failed this request every time
            raise RewriterRefused(
                f"rewriter server {url} (model {s.model}) answered HTTP {answered[0]} to all "
                f"{s.retries + 1} attempt(s): {answered[1]}"
            )
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
