"""ASD, Answer Style Diversification (docs/design.md §1.1): X% of every task's training records are
rewritten, in equal shares, into the answer styles the task does not natively use, so that no
task teaches a single answer format (the cause of superficial forgetting).

Pipeline of one task: `select` (stable seed) -> `build_request` (what each row needs) ->
a rewriter backend (`sefe_core.rewriter`: rules or a served model) -> `validate_material` ->
`assemble` (rules build the final question/answer, with the style's instruction from
`sefe_core.styles`). `run_asd` runs it in shards written atomically as they complete, so a killed
run loses at most the shard in flight and a rerun skips finished shards.

Style table (every task gets the styles of {yes_no, mcq, short, brief, detail} it does not use):

| native style | converted into                    | tasks                         |
| ------------ | --------------------------------- | ----------------------------- |
| mcq          | yes_no, short, brief, detail      | ScienceQA                     |
| short        | yes_no, mcq, brief, detail        | TextVQA, ImageNet, GQA, ...   |
| bbox         | yes_no, mcq, short, brief, detail | Grounding                     |

Grounding (bbox-native) uses none of the five, so it gets all five: yes_no asks "Is the answer
<box>?" with the true box or a distractor box (another object's box, or the true box moved until
it overlaps little); mcq letters the true box and three distractor boxes; brief/detail answer the
box then explain where the region is. A box is not a word or phrase, so its short form is the
inverse question on the same box-expression link: "Which object is inside the region <box>?" ->
the referring expression. Questions whose answer is yes/no (VQAv2, OCR-VQA) become yes_no rows
as they are, and two-option (yes/no) mcq rows: a third or fourth option would be nonsense.

`asd.recipe` picks the table: `full` (above, the default) or `reference`, the styles the reference
implementation (jinpeng0528/SEFE, `CoIN-ASD/prompts/<Task>/<style>.txt`) has prompts for, minus
the native style:

| task                                        | `reference` converts into  |
| ------------------------------------------- | -------------------------- |
| ScienceQA, ImageNet, Grounding              | brief, detail              |
| TextVQA, GQA, VizWiz, VQAv2, OCRVQA         | yes_no, mcq, brief, detail |

`asd.mode` says what a converted row does to its source: `add` (the default: every original record
stays, the ASD rows come after them) or `replace` (the ASD row takes its source's place, so the
task keeps its size; a rejected row keeps its source). The reference's released files
(`train_x{10,20,40,60,80}.json`, "annotations ... modified by our ASD") suggest replace but do not
say it; README.md has the evidence.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from data_contracts import (
    INSTRUCTIONS,
    REJECTS,
    InstructionRecord,
    RejectRecord,
    sha256_file,
    write_json,
)
from sefe_core.failpoints import failpoint
from sefe_core.hashing import config_hash, stable_seed
from sefe_core.registry import TaskSpec, benchmark_tasks, task_spec
from sefe_core.rewriter import (
    Material,
    Rejection,
    Rewriter,
    RewriteRequest,
    RewriterError,
    ServerConfig,
    make_rewriter,
    validate_material,
)
from sefe_core.rewriter_server import ensure_server
from sefe_core.scenes import LETTERS
from sefe_core.styles import (
    GROUNDING_PREFIX,
    MCQ_SUFFIX,
    SHORT_SUFFIX,
    STYLE_INSTRUCTIONS,
    UNANSWERABLE_SUFFIX,
    format_ok,
)

log = logging.getLogger(__name__)

# Bump when selection, assembly or the rules change what ASD writes: part of the shard key.
ASD_VERSION = 2  # 2: rejects record whether they are retryable
ASD_STYLES = ("yes_no", "mcq", "short", "brief", "detail")
REJECT_STEP = "asd"
SERVER_LOG = "rewriter-server.log"  # a launched rewriter server's output, beside the ASD data
_OPTION_LINE = re.compile(r"^[A-E]\. ")


# The styles the reference has ASD prompts for, per CoIN task (its prompt folder's name; `yn` is
# our yes_no): CoIN-ASD/prompts/<Task>/{yn,mcq,brief,detail}.txt in jinpeng0528/SEFE.
REFERENCE_STYLES: dict[str, tuple[str, ...]] = {
    "ScienceQA": ("brief", "detail"),  # brief/detail_w_image.txt and _wo_image.txt
    "TextVQA": ("yes_no", "mcq", "brief", "detail"),
    "ImageNet": ("brief", "detail"),
    "GQA": ("yes_no", "mcq", "brief", "detail"),
    "VizWiz": ("yes_no", "mcq", "brief", "detail"),
    "Grounding": ("brief", "detail"),
    "VQAv2": ("yes_no", "mcq", "brief", "detail"),
    "OCRVQA": ("yes_no", "mcq", "brief", "detail"),
}
RECIPES = ("full", "reference")


def target_styles(native_style: str, recipe: str = "full", coin_name: str | None = None) -> tuple[str, ...]:
    """The ASD styles a task with `native_style` is converted into (the module docstring's tables);
    the `reference` recipe needs the task's CoIN name (`TaskSpec.coin_name`)."""
    if recipe == "full":
        return tuple(s for s in ASD_STYLES if s != native_style)
    if recipe != "reference":
        raise ValueError(f"unknown asd.recipe {recipe!r}; known: {', '.join(RECIPES)}")
    if coin_name not in REFERENCE_STYLES:
        raise ValueError(
            f"asd.recipe=reference: the reference has no ASD prompts for task {coin_name!r} "
            f"(it has them for {', '.join(REFERENCE_STYLES)}); use asd.recipe=full"
        )
    return tuple(s for s in REFERENCE_STYLES[coin_name] if s != native_style)


def task_styles(spec: TaskSpec, recipe: str = "full") -> tuple[str, ...]:
    return target_styles(spec.native_style, recipe, spec.coin_name)


def style_table(benchmark: str = "minicoin", recipe: str = "full") -> dict[str, tuple[str, ...]]:
    return {t.name: task_styles(t, recipe) for t in benchmark_tasks(benchmark)}


class ASDConfig(BaseModel):
    """What ASD converts, how, and with which backend."""

    # inf/nan are refused here, not found later as NaN weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    percent: float = Field(20.0, gt=0, le=100, description="share of each task's train records converted")
    seed: int = 0
    recipe: Literal["full", "reference"] = Field(
        "full",
        description="which styles each task is converted into: 'full' (every style it does not use) "
        "or 'reference' (the styles the reference implementation has prompts for: ScienceQA, "
        "ImageNet and Grounding only brief/detail)",
    )
    mode: Literal["add", "replace"] = Field(
        "add",
        description="'add': the ASD rows come on top of every original record; 'replace': an ASD row "
        "takes its source record's place (the task keeps its size)",
    )
    backend: Literal["rules", "openai"] = "rules"
    shard_size: int = Field(64, ge=1, description="converted rows per shard (a resume unit)")
    retry_rejects: Literal["none", "retryable", "all"] = Field(
        "retryable",
        description="which stored rejects a rerun sends to the rewriter again: 'retryable' (the "
        "reply was unusable: server error, not the asked JSON), 'all' (also well-formed answers "
        "that failed validation), 'none'",
    )
    max_reject_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="a task with a larger share of its selected rows rejected fails (rejects are "
        "kept, a rerun retries them) instead of training on mostly original data",
    )
    server: ServerConfig = Field(default_factory=ServerConfig)

    def retries(self, reject: RejectRecord) -> bool:
        """Does a rerun send this stored reject to the rewriter again?"""
        return self.retry_rejects == "all" or (self.retry_rejects == "retryable" and reject.retryable)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
def select(
    records: Sequence[InstructionRecord],
    percent: float,
    seed: int,
    native_style: str,
    styles: Sequence[str] | None = None,
) -> list[tuple[InstructionRecord, str]]:
    """`percent`% of the train records (stable seed), each given one of `styles` (default: the
    `full` recipe's) in equal shares (counts differ by at most one), in the records' own order."""
    train = [r for r in records if r.split == "train" and r.origin == "original"]
    if not train:
        return []
    task = train[0].task
    rng = np.random.default_rng(stable_seed("asd-select", seed, task))
    n = int(len(train) * percent / 100 + 0.5)
    chosen = rng.permutation(len(train))[:n]
    styles = tuple(styles) if styles is not None else target_styles(native_style)
    rotation = [styles[int(i)] for i in rng.permutation(len(styles))]  # who gets the remainder
    picks = {int(idx): rotation[j % len(styles)] for j, idx in enumerate(chosen)}
    return [(train[i], picks[i]) for i in sorted(picks)]


# --------------------------------------------------------------------------------------------
# Requests and rule assembly
# --------------------------------------------------------------------------------------------
def core_question(record: InstructionRecord, native_style: str, keep_unanswerable: bool = True) -> str:
    """The question without its response-format instruction (and a native mcq's option lines)."""
    drop = {SHORT_SUFFIX, MCQ_SUFFIX, *STYLE_INSTRUCTIONS.values()}
    if not keep_unanswerable:  # the yes/no candidate or the mcq options carry it instead
        drop.add(UNANSWERABLE_SUFFIX)
    lines = [ln for ln in record.question.split("\n") if ln.strip() not in drop]
    if native_style == "mcq":
        lines = [ln for ln in lines if not _OPTION_LINE.match(ln)]
    return "\n".join(lines).strip()


def correct_answer(record: InstructionRecord, native_style: str) -> str:
    """The correct answer as content: a native mcq letter resolved to its option text."""
    if native_style != "mcq":
        return record.answer.strip()
    meta = record.meta_dict
    if isinstance(meta.get("answer_text"), str):
        return meta["answer_text"]
    letter = record.answer.strip().rstrip(".")
    for ln in record.question.split("\n"):
        if ln.startswith(f"{letter}. "):
            return ln[3:].strip()
    raise ValueError(f"{record.id}: mcq answer {record.answer!r} matches no option line")


def grounding_expression(record: InstructionRecord) -> str:
    meta = record.meta_dict
    if isinstance(meta.get("expression"), str):
        return meta["expression"]
    q = record.question.split("\n")[0]
    return q.removeprefix(GROUNDING_PREFIX).strip().rstrip(".")


def asd_id(source_id: str, style: str) -> str:
    return f"{source_id}-asd-{style}"


def build_request(record: InstructionRecord, style: str, task_key: str, native_style: str) -> RewriteRequest:
    """What the row of `style` made from `record` needs from a rewriter (see the style table)."""
    correct = correct_answer(record, native_style)
    binary = correct.lower() in ("yes", "no")
    question = core_question(record, native_style, keep_unanswerable=style not in ("yes_no", "mcq"))
    n, explain = 0, style in ("brief", "detail")
    if style == "yes_no":
        n = 0 if binary else 1
    elif style == "mcq":
        n = 1 if binary else 3
    elif style == "short" and native_style == "bbox":
        question = f"Which object is inside the region {correct}?"
        correct = grounding_expression(record)
    return RewriteRequest(
        id=asd_id(record.id, style),
        record=record,
        task_key=task_key,
        style=style,
        question=question,
        correct=correct,
        n_distractors=n,
        explanation=explain,
    )


class AssemblyError(ValueError):
    """The assembled row does not have its style's format (the row is rejected, not written)."""


def assemble(req: RewriteRequest, m: Material, seed: int, backend: str) -> InstructionRecord:
    """The final ASD row: question + the style's instruction, answer in the style's format.
    yes_no flips a stable coin between the correct answer and a distractor; mcq shuffles the
    options with a stable seed and letters them A-D."""
    style, instr, correct = req.style, STYLE_INSTRUCTIONS[req.style], req.correct.strip()
    distractors = [d.strip() for d in m.distractors]
    info: dict[str, object] = {"style": style, "backend": backend, "answer_text": correct}
    if style == "yes_no" and not distractors:  # the question already asks yes or no
        question, answer = f"{req.question}\n{instr}", correct.capitalize()
    elif style == "yes_no":
        truth = stable_seed("asd-yes-no", seed, req.id) % 2 == 0
        candidate = correct if truth else distractors[0]
        question = f"{req.question}\nIs the answer {candidate}?\n{instr}"
        answer = "Yes" if truth else "No"
        info["candidate"] = candidate
    elif style == "mcq":
        options = [correct, *distractors]
        order = np.random.default_rng(stable_seed("asd-mcq", seed, req.id)).permutation(len(options))
        options = [options[int(i)] for i in order]
        index = options.index(correct)
        lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        question, answer = f"{req.question}\n{lines}\n{instr}", LETTERS[index]
        info.update(options=options, answer_index=index)
    elif style == "short":
        question, answer = f"{req.question}\n{instr}", correct
    else:
        question = f"{req.question}\n{instr}"
        answer = f"{correct.rstrip('.')}. {m.explanation.strip()}"
    if not format_ok(style, answer):
        raise AssemblyError(f"assembled {style} answer fails the {style} format check: {answer[:80]!r}")
    src = req.record
    return InstructionRecord(
        id=req.id,
        task=src.task,
        split=src.split,
        image=src.image,
        question=question,
        answer=answer,
        style=style,
        origin="asd",
        source_id=src.id,
        meta=json.dumps({**src.meta_dict, "asd": info}, sort_keys=True),
    )


def convert(
    requests: Sequence[RewriteRequest], outcomes: Sequence[Material | Rejection], seed: int, backend: str
) -> tuple[list[InstructionRecord], list[RejectRecord]]:
    """Validated, assembled rows and the rejects (reason + raw text) of one batch of outcomes."""
    if len(outcomes) != len(requests):
        raise RewriterError(
            f"rewriter {backend} returned {len(outcomes)} outcomes for {len(requests)} requests"
        )
    rows: list[InstructionRecord] = []
    rejects: list[RejectRecord] = []
    for req, out in zip(requests, outcomes, strict=True):
        reason = out.reason if isinstance(out, Rejection) else validate_material(req, out)
        if reason is None:
            try:
                rows.append(assemble(req, out, seed, backend))
                continue
            except AssemblyError as e:
                reason = str(e)
        retryable = isinstance(out, Rejection) and out.retryable
        rejects.append(RejectRecord(req.id, req.record.task, REJECT_STEP, reason, out.raw_text, retryable))
    return rows, rejects


# --------------------------------------------------------------------------------------------
# The sharded, resumable runner
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ASDResult:
    """Counts and paths of one task's ASD; `selected == converted + rejected` always holds."""

    task: str
    selected: int
    converted: int
    rejected: int
    per_style: dict[str, dict[str, int]]
    reasons: dict[str, int]
    data_path: Path
    rejects_path: Path
    manifest_path: Path
    shard_dir: Path
    shards: int
    shards_reused: int
    seconds: float
    reused: bool = False
    key: str = ""
    backend: str = ""
    retryable: int = 0  # rejects a rerun would send again (under the config's retry_rejects)


def plan_shards(requests: Sequence[RewriteRequest], size: int) -> list[list[int]]:
    """Request indices per shard: all rows of one image stay in one shard (one request each),
    images in order of first appearance, a shard closes once it holds `size` rows. A row without
    an image (a text-only question) is a group of its own."""
    by_image: dict[str | int, list[int]] = {}
    for i, r in enumerate(requests):
        by_image.setdefault(r.record.image if r.record.image is not None else i, []).append(i)
    shards: list[list[int]] = []
    cur: list[int] = []
    for idxs in by_image.values():
        cur += idxs
        if len(cur) >= size:
            shards.append(cur)
            cur = []
    if cur:
        shards.append(cur)
    return shards


def assemble_task(
    records: Sequence[InstructionRecord], rows: Sequence[InstructionRecord], mode: str
) -> list[InstructionRecord]:
    """A task's ASD file: `add` = every original record, then the ASD rows; `replace` = the
    original records with each converted one replaced, in its place, by its ASD row."""
    if mode == "add":
        return [*records, *rows]
    if mode != "replace":
        raise ValueError(f"unknown asd.mode {mode!r}; known: add, replace")
    by_source = {r.source_id: r for r in rows}
    if len(by_source) != len(rows):
        raise RuntimeError("ASD rows with the same source record: asd.mode=replace needs one per source")
    return [by_source.get(r.id, r) for r in records]


def _summary(
    rows: list[InstructionRecord], rejects: list[RejectRecord], styles: dict[str, str]
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    per_style = {s: {"converted": 0, "rejected": 0} for s in sorted(set(styles.values()))}
    for r in rows:
        per_style[r.style]["converted"] += 1
    for r in rejects:
        per_style[styles[r.id]]["rejected"] += 1
    reasons = Counter(re.sub(r"\(.*", "", r.reason).strip() for r in rejects)
    return per_style, dict(reasons.most_common())


def run_asd(
    task_parquet: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    cfg: ASDConfig,
    *,
    benchmark: str = "minicoin",
    rewriter: Rewriter | None = None,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] = log.info,
) -> ASDResult:
    """ASD of one task file into `out_dir/<task>.parquet` (all original records, both splits, then
    the ASD rows) and `out_dir/<task>.rejects.parquet`; shards under `out_dir/shards/<task>/<key>/`.

    The key hashes the input file and everything that changes the output, so a rerun reuses
    exactly the shards that are still right. `progress(done, total)` is called per shard; `say`
    gets the start-up lines of a server `asd.server.launch` starts (once per process).
    Raises `RewriterUnavailable` (saying what is saved) if the server stays down.
    """
    t0 = time.perf_counter()
    task_parquet, image_root, out_dir = Path(task_parquet), Path(image_root), Path(out_dir)
    records = INSTRUCTIONS.read_records(task_parquet)
    tasks = sorted({r.task for r in records})
    if len(tasks) != 1:
        raise ValueError(f"{task_parquet}: ASD converts one task per file, found tasks {tasks}")
    if any(r.origin != "original" for r in records):
        raise ValueError(f"{task_parquet}: already holds ASD rows; give the task's original records")
    task = tasks[0]
    spec = task_spec(benchmark, task)
    wrong = sorted({r.style for r in records} - {spec.native_style})
    if wrong:
        raise ValueError(f"{task_parquet}: task {task} is {spec.native_style}-native, found styles {wrong}")
    styles = task_styles(spec, cfg.recipe)
    if rewriter is None and cfg.backend == "openai":  # asd.server.launch: start it (once per process)
        ensure_server(cfg.server.base_url, cfg.server.model, cfg.server.launch, out_dir / SERVER_LOG, say=say)
    rewriter = rewriter or make_rewriter(cfg.backend, cfg.seed, cfg.server)
    what = {
        "version": ASD_VERSION,
        "input": sha256_file(task_parquet),
        "percent": cfg.percent,
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "rewriter": rewriter.fingerprint(),
    }
    if cfg.recipe != "full":  # the default recipe keeps the keys (and shards) of runs before it existed
        what["recipe"] = cfg.recipe
    key = config_hash(what)  # asd.mode is not in it: the shards are the same, only assembly differs
    data_path = out_dir / f"{task}.parquet"
    rejects_path = out_dir / f"{task}.rejects.parquet"
    manifest_path = out_dir / f"{task}.asd.json"
    shard_dir = out_dir / "shards" / task / key
    paths = dict(
        data_path=data_path, rejects_path=rejects_path, manifest_path=manifest_path, shard_dir=shard_dir
    )

    done = _finished(manifest_path, key, cfg)
    if done is not None:
        return ASDResult(task=task, **done, **paths, seconds=time.perf_counter() - t0, reused=True, key=key)

    picks = select(records, cfg.percent, cfg.seed, spec.native_style, styles)
    requests = [build_request(r, s, spec.scorer, spec.native_style) for r, s in picks]
    check = getattr(rewriter, "check", None)
    if check is not None:  # a missing prompt fails here, before any request is sent
        check(requests)
    style_of = {req.id: req.style for req in requests}
    shards = plan_shards(requests, cfg.shard_size)
    rows: list[InstructionRecord] = []
    rejects: list[RejectRecord] = []
    reused = 0
    for i, idxs in enumerate(shards):
        rows_file, rej_file = shard_dir / f"{i:05d}.parquet", shard_dir / f"{i:05d}.rejects.parquet"
        batch = [requests[j] for j in idxs]
        srows: list[InstructionRecord] = []
        srej: list[RejectRecord] = []
        if rows_file.exists() and rej_file.exists():  # rows are written last: their file marks done
            srows, srej = INSTRUCTIONS.read_records(rows_file), REJECTS.read_records(rej_file)
            if sorted(r.id for r in [*srows, *srej]) != sorted(r.id for r in batch):
                raise RuntimeError(
                    f"{rows_file}: holds other rows than its plan; delete {shard_dir} and rerun"
                )
            again = {r.id for r in srej if cfg.retries(r)}
            batch = [r for r in batch if r.id in again]  # what this rerun sends again
            srej = [r for r in srej if r.id not in again]
            reused += not batch
        if batch:
            try:
                outcomes = rewriter.rewrite(batch, image_root)
            except RewriterError as e:
                raise type(e)(
                    f"{e}\nASD of {task}: {i} of {len(shards)} shards are saved under {shard_dir} "
                    "and are kept; rerun the same command to resume from there."
                ) from e
            new_rows, new_rej = convert(batch, outcomes, cfg.seed, rewriter.name)
            order = {r.id: n for n, r in enumerate(requests[j] for j in idxs)}
            srows = sorted([*srows, *new_rows], key=lambda r: order[r.id])
            srej = sorted([*srej, *new_rej], key=lambda r: order[r.id])
            rows_file.unlink(missing_ok=True)  # a retried shard is not done until its rows are rewritten
            REJECTS.write(srej, rej_file)
            INSTRUCTIONS.write(srows, rows_file)
            failpoint("asd.shard")
        rows += srows
        rejects += srej
        if progress is not None:
            progress(i + 1, len(shards))
    if len(rows) + len(rejects) != len(requests):
        raise RuntimeError(
            f"ASD of {task}: selected {len(requests)} != converted {len(rows)} + rejected {len(rejects)}"
        )
    rej_info = REJECTS.write(rejects, rejects_path)
    per_style, reasons = _summary(rows, rejects, style_of)
    retryable = sum(cfg.retries(r) for r in rejects)
    if requests and len(rejects) > cfg.max_reject_fraction * len(requests):
        raise _too_many_rejects(task, len(requests), rejects, retryable, reasons, rejects_path, cfg)
    if rejects:
        log.warning(
            "ASD %s: %d of %d selected rows rejected (%d sent again on a rerun), kept in %s; most common: %s",
            task, len(rejects), len(requests), retryable, rejects_path, next(iter(reasons)),
        )  # fmt: skip
    data_info = INSTRUCTIONS.write(assemble_task(records, rows, cfg.mode), data_path)
    counts = dict(selected=len(requests), converted=len(rows), rejected=len(rejects))
    write_json(
        manifest_path,
        {
            "key": key,
            "mode": cfg.mode,
            "task": task,
            "backend": rewriter.name,
            **counts,
            "per_style": per_style,
            "reasons": reasons,
            "shards": len(shards),
            "retryable": sorted(r.id for r in rejects if r.retryable),
            "files": {data_path.name: data_info.sha256, rejects_path.name: rej_info.sha256},
            "bytes": {data_path.name: data_info.bytes, rejects_path.name: rej_info.bytes},
            "config": cfg.model_dump(mode="json"),
        },
    )
    log.info("ASD %s: selected %d = converted %d + rejected %d", task, *counts.values())
    return ASDResult(
        task=task,
        **counts,
        per_style=per_style,
        reasons=reasons,
        **paths,
        shards=len(shards),
        shards_reused=reused,
        seconds=time.perf_counter() - t0,
        key=key,
        backend=rewriter.name,
        retryable=retryable,
    )


class TooManyRejects(RuntimeError):
    """More of a task's selected rows were rejected than `asd.max_reject_fraction` allows: training
    "with ASD" on it would mostly train on the original data, under ASD's name."""

    def __init__(self, message: str, retryable: int = 0) -> None:
        super().__init__(message)
        self.retryable = retryable  # how many a rerun sends again

    def __reduce__(self) -> tuple:  # crosses processes whole (Prefect, the worker pool)
        return type(self), (str(self), self.retryable)


def _too_many_rejects(
    task: str, selected: int, rejects: list[RejectRecord], again: int, reasons: dict[str, int], path: Path,
    cfg: ASDConfig,
) -> TooManyRejects:  # fmt: skip
    top = "; ".join(f"{n} x {reason}" for reason, n in list(reasons.items())[:3])
    then = (
        f"{again} of them are sent again on a rerun (asd.retry_rejects={cfg.retry_rejects}): fix the "
        "rewriter (its server, model or prompts) and rerun the same command"
        if again
        else f"a rerun would not send them again (asd.retry_rejects={cfg.retry_rejects}): use a rewriter "
        "that can write these rows (asd.backend=openai for real data), set asd.retry_rejects=all to send "
        "a served model's rejected answers again, or raise asd.max_reject_fraction to go on without them"
    )
    return TooManyRejects(
        f"ASD of {task}: {len(rejects)} of {selected} selected rows rejected ({100 * len(rejects) / selected:.0f}%"
        f" > asd.max_reject_fraction={cfg.max_reject_fraction:g}). Most common: {top}. Every reject, with "
        f"the raw reply, is in {path}; {then}.",
        again,
    )


def _finished(manifest_path: Path, key: str, cfg: ASDConfig) -> dict | None:
    """The counts of a finished run with the same key whose files are intact and that holds no
    reject this config retries, else None."""
    if not manifest_path.exists():
        return None
    m = json.loads(manifest_path.read_text())
    if m.get("key") != key or m.get("mode", "add") != cfg.mode:  # another mode: reassembled from the shards
        return None
    if (cfg.retry_rejects == "all" and m["rejected"]) or (
        cfg.retry_rejects == "retryable" and m["retryable"]
    ):
        return None
    for name, sha in m["files"].items():
        p = manifest_path.parent / name
        if not p.exists() or sha256_file(p) != sha:
            return None
    return dict(
        selected=m["selected"],
        converted=m["converted"],
        rejected=m["rejected"],
        per_style=m["per_style"],
        reasons=m["reasons"],
        shards=m["shards"],
        shards_reused=m["shards"],
        backend=m["backend"],
    )
