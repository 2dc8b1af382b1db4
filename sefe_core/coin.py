"""Real CoIN: the eight tasks read from a local data root laid out as the reference does.

Layout (SEFE README, "Data Organization and Structure"; CoIN's own eval scripts):

```
<root>/
  annotations/<Task>/train.json      LLaVA conversations: id, image, conversations[human, gpt]
  annotations/<Task>/train_x20.json  (optional) the released CoIN-ASD annotations, X = 20
  annotations/<Task>/test.json       question_id, image, text (+ per-task ground truth)
  ScienceQA/problems.json            ScienceQA ground truth: {pid: {choices, answer (index), ...}}
  TextVQA/TextVQA_0.5.1_val.json     TextVQA ground truth: {"data": [{question_id, answers (10)}]}
  GQA/testdev_balanced_questions.json GQA ground truth: {question_id: {answer, ...}}
  <image folders>                    record `image` paths are relative to the root (image folder)
```

Test ground truth per task, as the reference evaluators read it: ScienceQA from problems.json
(by question_id), TextVQA from the TextVQA val file (ten answers), GQA from testdev-balanced
questions, Grounding from the test record's own `answer_bbox` (a box normalised by the longer
image side, i.e. in LLaVA's square-padded frame) and `size`, the others from the record's
`answer`. A record without `image` (ScienceQA's text-only questions) is kept as a text-only
record: the reference trains and evaluates them with no image in the prompt.
Records become `InstructionRecord`s; whatever cannot be used (image missing or
unreadable, malformed record, no ground truth, unknown task folder) becomes a `RejectRecord`
with its reason, never a silent drop. A whole file that is missing or not JSON is an error.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from data_contracts import INSTRUCTIONS, REJECTS, FileInfo, InstructionRecord, RejectRecord
from sefe_core.hashing import stable_seed
from sefe_core.kinds import get_kind
from sefe_core.registry import COIN_TASKS, TaskSpec
from sefe_core.styles import BRIEF_WORDS, MCQ_RE, MCQ_SUFFIX, SHORT_MAX_WORDS, SHORT_SUFFIX, parse_box

LETTERS = "ABCDE"
REJECT_STEP = "load"
ANNOTATIONS_DIR = "annotations"
UNKNOWN_REJECTS_FILE = "_unknown-tasks.rejects.parquet"
# CoIN folder name -> our task spec (ScienceQA -> 01-scienceqa, ...).
COIN_FOLDERS: dict[str, TaskSpec] = {t.coin_name: t for t in COIN_TASKS}
# Ground-truth files of the reference layout, relative to the data root.
DEFAULT_SCIENCEQA_PROBLEMS = "ScienceQA/problems.json"
DEFAULT_TEXTVQA_VAL = "TextVQA/TextVQA_0.5.1_val.json"
DEFAULT_GQA_QUESTIONS = "GQA/testdev_balanced_questions.json"

_IMAGE_TOKEN = re.compile(r"<image>")
_OPTION_LINE = re.compile(r"^\(?([A-E])[.)]\s+(.+)$")
_OPTION_INLINE = re.compile(r"\(([A-E])\)\s*(.*?)(?=\s*\([A-E]\)|$)")


class CoINError(ValueError):
    """A whole input file is unusable (missing, not JSON, wrong shape): names the file."""


class CoINConfig(BaseModel):
    """Where the CoIN data lives and what to load from it.

    Ground-truth paths are relative to `root` (or absolute); None means "use the test record's
    own `answer` field instead". `asd_annotations` says whether the train file may hold ASD
    rows whose style is detected from the answer (auto: when the file name is `train_x*.json`).
    `check_images` decodes every image once (PIL; at most `max_image_pixels`); off, only their
    existence is checked. Either way an image (or a symlink) that resolves outside the image
    root is rejected.
    `max_train` / `max_test` keep a deterministic subsample (seeded by `seed`) per task.
    """

    # inf/nan are refused here, not found later as NaN weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    root: str
    image_root: str | None = None
    tasks: tuple[str, ...] = Field(default_factory=lambda: tuple(t.name for t in COIN_TASKS))
    train_file: str = "train.json"
    test_file: str = "test.json"
    scienceqa_problems: str | None = DEFAULT_SCIENCEQA_PROBLEMS
    textvqa_val: str | None = DEFAULT_TEXTVQA_VAL
    gqa_questions: str | None = DEFAULT_GQA_QUESTIONS
    asd_annotations: bool | None = None
    max_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)
    seed: int = 0
    check_images: bool = True
    # an image larger than this (width x height) is rejected before it is decoded: a PNG header
    # can claim 12000 x 12000 (2.8 GB decoded) for a file of a few bytes
    max_image_pixels: int = Field(40_000_000, gt=0)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        known = [t.name for t in COIN_TASKS]
        unknown = [t for t in v if t not in known]
        if unknown or not v or len(set(v)) != len(v):
            raise ValueError(f"coin.tasks must be distinct names from {known}, got {list(v)}")
        return tuple(t for t in known if t in v)  # always in CoIN's order

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser()

    @property
    def image_root_path(self) -> Path:
        return Path(self.image_root).expanduser() if self.image_root else self.root_path

    @property
    def detects_styles(self) -> bool:
        if self.asd_annotations is not None:
            return self.asd_annotations
        return Path(self.train_file).name.startswith("train_x")

    def resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.root_path / p

    def annotation_file(self, spec: TaskSpec, split: str) -> Path:
        name = self.train_file if split == "train" else self.test_file
        return self.root_path / ANNOTATIONS_DIR / spec.coin_name / name

    def ground_truth_file(self, spec: TaskSpec) -> Path | None:
        field_name = get_kind(spec.scorer).coin.truth_field  # e.g. scienceqa_problems
        rel = getattr(self, field_name) if field_name else None
        return None if rel is None else self.resolve(rel)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def input_files(cfg: CoINConfig) -> list[Path]:
    """Every annotation and ground-truth file `build_coin` reads (for the cache key)."""
    out: list[Path] = []
    for name in cfg.tasks:
        spec = _spec(name)
        out += [cfg.annotation_file(spec, "train"), cfg.annotation_file(spec, "test")]
        gt = cfg.ground_truth_file(spec)
        if gt is not None:
            out.append(gt)
    return out


def input_fingerprint(cfg: CoINConfig) -> dict[str, Any]:
    """A cheap fingerprint of the inputs: (size, mtime_ns) of every file read, and the task
    folders present (an unknown folder changes the rejects). Images are not fingerprinted."""
    files = {}
    for p in input_files(cfg):
        try:
            st = p.stat()
            files[str(p)] = [st.st_size, st.st_mtime_ns]
        except OSError:
            files[str(p)] = None
    ann = cfg.root_path / ANNOTATIONS_DIR
    folders = sorted(p.name for p in ann.iterdir() if p.is_dir()) if ann.is_dir() else []
    return {"files": files, "folders": folders}


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CoINError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CoINError(f"{path}: {what} is not valid JSON ({e})") from None


def _load_records(path: Path, what: str) -> list[Any]:
    data = _load_json(path, what)
    if not isinstance(data, list):
        raise CoINError(f"{path}: {what} must be a JSON list of records, got {type(data).__name__}")
    return data


def _subsample(records: list[Any], n: int | None, seed: int, task: str, split: str) -> list[Any]:
    """At most `n` records, chosen with a stable seed, kept in file order."""
    if n is None or len(records) <= n:
        return records
    rng = np.random.default_rng(stable_seed("coin-subsample", seed, task, split))
    keep = sorted(int(i) for i in rng.choice(len(records), size=n, replace=False))
    return [records[i] for i in keep]


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Truth:
    """The scorer's reference string and the meta it reads (options, ten answers, box)."""

    answer: str
    meta: dict[str, Any]


def load_ground_truth(spec: TaskSpec, cfg: CoINConfig) -> dict[str, Any] | None:
    """The task's ground-truth table keyed by question id (str), or None for tasks (or configs)
    whose test records carry their own answer."""
    path = cfg.ground_truth_file(spec)
    if path is None:
        return None
    adapter = get_kind(spec.scorer).coin
    if not path.is_file():
        raise CoINError(
            f"{path}: {spec.coin_name} ground truth not found; set benchmark.coin."
            f"{adapter.truth_field} to its path, or to null to score the test records' own 'answer'"
        )
    data = _load_json(path, f"{spec.coin_name} ground truth")
    try:
        return adapter.table(data)  # the kind's file layout -> {question id: entry}
    except ValueError as e:
        raise CoINError(f"{path}: {spec.coin_name} {e}") from None


def majority_answer(answers: list[str]) -> str:
    """The most frequent annotator answer (first seen wins a tie): TextVQA's reference string."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def parse_options(question: str) -> list[str]:
    """Option texts of a multiple-choice question: "A. x" lines, or inline "(A) x (B) y"."""
    lines = [m for ln in question.split("\n") if (m := _OPTION_LINE.match(ln.strip()))]
    if lines:
        letters = [m.group(1) for m in lines]
        if letters == list(LETTERS[: len(letters)]):
            return [m.group(2).strip() for m in lines]
    inline = _OPTION_INLINE.findall(question)
    if inline and [m[0] for m in inline] == list(LETTERS[: len(inline)]):
        return [m[1].strip() for m in inline]
    return []


def coin_box(value: Any) -> list[float] | None:
    """A box as CoIN writes one: four numbers, as a list or a (bracketed) string."""
    if isinstance(value, list | tuple) and len(value) == 4:
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            return None
    if isinstance(value, str):
        return parse_box(value) or parse_box(f"[{value.strip().strip('[]')}]")
    return None


def coin_size(value: Any) -> list[int] | None:
    """An image size [width, height] as CoIN writes one."""
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return [int(v) for v in value]
    return None


def ground_truth_of(
    spec: TaskSpec, rec: dict[str, Any], qid: str, question: str, table: dict | None
) -> Truth | str:
    """The ground truth of one test record, or the reason there is none: the task kind's own
    (its CoIN adapter: a ground-truth file, a box field), else the record's `answer`."""
    own = get_kind(spec.scorer).coin.truth
    truth = own(rec, qid, question, table) if own is not None else None
    if truth is not None:
        return truth
    ans = rec.get("answer")
    if not isinstance(ans, str) or not ans.strip():
        return "no ground truth: test record has no 'answer'"
    return Truth(ans.strip(), {})


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
def strip_image_token(text: str) -> str:
    """The human turn without LLaVA's `<image>` placeholder line."""
    lines = [_IMAGE_TOKEN.sub("", ln).strip() for ln in text.split("\n")]
    return "\n".join(ln for ln in lines if ln).strip()


def detect_style(question: str, answer: str, native: str) -> str:
    """The answer style of a CoIN-ASD train row, read off the answer and the instruction.

    The released CoIN-ASD files mix original and converted rows without a style field: a box is
    `bbox`, an option letter with options in the question `mcq`, a row carrying CoIN's
    single-word instruction `short`, Yes/No without it `yes_no`, longer answers `brief` or
    `detail` (by an explicit cue, else by length).
    """
    a = answer.strip()
    if parse_box(a) is not None:
        return "bbox"
    if MCQ_RE.match(a) and (parse_options(question) or MCQ_SUFFIX in question):
        return "mcq"
    if SHORT_SUFFIX in question:
        return "short"
    if a.rstrip(".").lower() in ("yes", "no"):
        return "yes_no"
    n = len(a.split())
    if n <= SHORT_MAX_WORDS:
        return native if native in ("short", "yes_no") else "short"
    cue = question.lower().split("\n")[-1]
    if "brief" in cue:
        return "brief"
    if "detail" in cue:
        return "detail"
    return "brief" if n <= BRIEF_WORDS[1] else "detail"


@dataclass
class _ImageChecker:
    """Checks each image once and remembers the outcome per path: inside the image root (links
    resolved), within the pixel limit, and decoding to the end (a truncated file fails here, at
    prepare, with its name, not in the middle of training)."""

    root: Path
    check: bool
    max_pixels: int = 40_000_000
    seen: dict[str, tuple[str | None, list[int] | None]] = field(default_factory=dict)

    def __call__(self, rel: str) -> tuple[str | None, list[int] | None]:
        """(reject reason or None, [width, height] or None)."""
        if rel in self.seen:
            return self.seen[rel]
        path = self.root / rel
        out: tuple[str | None, list[int] | None]
        if not path.is_file():
            out = (f"image file missing: {rel}", None)
        elif not path.resolve().is_relative_to(self.root.resolve()):
            out = (f"image outside the image root: {rel} -> {path.resolve()}", None)
        elif not self.check:
            out = (None, None)
        else:
            try:
                with Image.open(path) as im:
                    size = [int(im.width), int(im.height)]
                    if size[0] * size[1] > self.max_pixels:
                        out = (
                            f"image too large: {rel} ({size[0]}x{size[1]} > max_image_pixels {self.max_pixels})",
                            None,
                        )
                    else:
                        im.load()  # decodes to the end: truncated data fails here
                        out = (None, size)
            except Exception as e:  # PIL raises many types for a broken file
                out = (f"image unreadable: {rel} ({type(e).__name__}: {e})", None)
        self.seen[rel] = out
        return out


_TEXT_ONLY = ""  # `_image_path`'s answer for a record without an image


def _image_path(rec: dict[str, Any]) -> str | None:
    """The record's image path; `_TEXT_ONLY` when it has none (the key left out, as CoIN's
    converter does for ScienceQA's text-only questions, or null); None when it is unusable."""
    img = rec.get("image")
    if img is None:
        return _TEXT_ONLY
    if not isinstance(img, str) or not img.strip():
        return None
    img = img.strip()
    if img.startswith("/") or ".." in img.split("/"):
        return None
    return img


def _check_image(image: str, images: _ImageChecker) -> tuple[str | None, Any]:
    """(reject reason, size) of a record's image; a text-only record has neither."""
    return (None, None) if image == _TEXT_ONLY else images(image)


def _raw(rec: Any) -> str:
    text = json.dumps(rec, ensure_ascii=False, default=str)
    if _not_unicode(text):  # a lone surrogate cannot be written to Parquet: keep it escaped
        text = json.dumps(rec, default=str)
    return text[:2000]


def _not_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _unicode_problem(rec: Any) -> str | None:
    """Valid JSON can hold text that is not Unicode (a lone surrogate such as "\\ud800"):
    the record is rejected with the reason, the rest of the file still loads."""
    if _not_unicode(json.dumps(rec, ensure_ascii=False, default=str)):
        return "malformed record: text that is not valid Unicode (a lone surrogate escape)"
    return None


def _rid(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    s = str(value).strip()
    return s or None


@dataclass
class _TaskLoad:
    records: list[InstructionRecord] = field(default_factory=list)
    rejects: list[RejectRecord] = field(default_factory=list)
    _reject_ids: set[str] = field(default_factory=set)

    def reject(self, rid: str, task: str, reason: str, raw: str) -> None:
        base, i = rid, 1
        while rid in self._reject_ids:  # the rejects contract keys on (id, step)
            i += 1
            rid = f"{base}#{i}"
        self._reject_ids.add(rid)
        self.rejects.append(RejectRecord(rid, task, REJECT_STEP, reason, raw))


def _train_record(
    spec: TaskSpec, rec: Any, cfg: CoINConfig, images: _ImageChecker, problems: dict | None
) -> InstructionRecord | str:
    """One LLaVA conversation -> an instruction record, or the reason it cannot be one."""
    if not isinstance(rec, dict):
        return f"malformed record: not a JSON object ({type(rec).__name__})"
    if (problem := _unicode_problem(rec)) is not None:
        return problem
    cid = _rid(rec.get("id"))
    if cid is None:
        return "malformed record: no 'id'"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) != 2:
        n = len(conv) if isinstance(conv, list) else 0
        return f"malformed record: expected 2 conversation turns (human, gpt), got {n}"
    human, gpt = conv
    if not (isinstance(human, dict) and isinstance(gpt, dict)):
        return "malformed record: conversation turns must be objects"
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        return f"malformed record: turns from {human.get('from')!r}, {gpt.get('from')!r}; expected human, gpt"
    q, a = human.get("value"), gpt.get("value")
    if not isinstance(q, str) or not isinstance(a, str):
        return "malformed record: turn values must be strings"
    question, answer = strip_image_token(q), a.strip()
    if not question:
        return "malformed record: empty question"
    if not answer:
        return "malformed record: empty answer"
    image = _image_path(rec)
    if image is None:
        return f"malformed record: 'image' must be a relative path, got {rec.get('image')!r:.80}"
    reason, size = _check_image(image, images)
    if reason is not None:
        return reason
    style = detect_style(question, answer, spec.native_style) if cfg.detects_styles else spec.native_style
    meta: dict[str, Any] = {"coin_id": cid}
    if size is not None:
        meta["image_size"] = size
    train_meta = get_kind(spec.scorer).coin.train_meta
    if train_meta is not None:  # e.g. ScienceQA's options and solution, Grounding's box
        meta.update(train_meta(question, answer, cid, problems))
    return InstructionRecord(
        id=f"{spec.name}-train-{cid}",
        task=spec.name,
        split="train",
        image=image or None,
        question=question,
        answer=answer,
        style=style,
        origin="original" if style == spec.native_style else "asd",
        source_id=cid,
        meta=json.dumps(meta, sort_keys=True),
    )


def _test_record(
    spec: TaskSpec, rec: Any, images: _ImageChecker, table: dict | None
) -> InstructionRecord | str:
    if not isinstance(rec, dict):
        return f"malformed record: not a JSON object ({type(rec).__name__})"
    if (problem := _unicode_problem(rec)) is not None:
        return problem
    qid = _rid(rec.get("question_id"))
    if qid is None:
        return "malformed record: no 'question_id'"
    text = rec.get("text")
    if not isinstance(text, str) or not strip_image_token(text):
        return "malformed record: no question 'text'"
    question = strip_image_token(text)
    as_asked = get_kind(spec.scorer).coin.test_question
    if as_asked is not None:  # as the reference evaluation asks it (ScienceQA: + its suffix)
        question = as_asked(question)
    image = _image_path(rec)
    if image is None:
        return f"malformed record: 'image' must be a relative path, got {rec.get('image')!r:.80}"
    truth = ground_truth_of(spec, rec, qid, question, table)
    if isinstance(truth, str):
        return truth
    reason, size = _check_image(image, images)
    if reason is not None:
        return reason
    meta = {"coin_id": qid, **truth.meta}
    if size is not None:
        meta.setdefault("image_size", size)
    return InstructionRecord(
        id=f"{spec.name}-test-{qid}",
        task=spec.name,
        split="test",
        image=image or None,
        question=question,
        answer=truth.answer,
        style=spec.native_style,
        origin="original",
        source_id=qid,
        meta=json.dumps(meta, sort_keys=True),
    )


def load_task(spec: TaskSpec, cfg: CoINConfig, images: _ImageChecker | None = None) -> _TaskLoad:
    """Both splits of one task: the records and the rejects (with reasons)."""
    images = images or _ImageChecker(cfg.image_root_path, cfg.check_images, cfg.max_image_pixels)
    train_path, test_path = cfg.annotation_file(spec, "train"), cfg.annotation_file(spec, "test")
    train = _load_records(train_path, f"{spec.coin_name} train annotations")
    test = _load_records(test_path, f"{spec.coin_name} test annotations")
    table = load_ground_truth(spec, cfg)
    out = _TaskLoad()
    seen: set[str] = set()
    for split, raw_records in (("train", train), ("test", test)):
        limit = cfg.max_train if split == "train" else cfg.max_test
        for i, rec in enumerate(_subsample(raw_records, limit, cfg.seed, spec.name, split)):
            made = (
                _train_record(spec, rec, cfg, images, table)
                if split == "train"
                else _test_record(spec, rec, images, table)
            )
            raw_id = (
                _rid(rec.get("id" if split == "train" else "question_id")) if isinstance(rec, dict) else None
            )
            rid = f"{spec.name}-{split}-{raw_id if raw_id is not None else f'#{i}'}"
            if isinstance(made, InstructionRecord) and made.id in seen:
                made = f"malformed record: duplicate {split} id {made.source_id!r}"
            if isinstance(made, str):
                out.reject(rid, spec.name, made, _raw(rec))
            else:
                seen.add(made.id)
                out.records.append(made)
    return out


# --------------------------------------------------------------------------------------------
# The benchmark directory
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskBuild:
    """What one task's loading produced: its files, counts and the commonest reject reasons."""

    task: str
    coin_name: str
    file: FileInfo
    rejects_file: FileInfo
    train: int
    test: int
    asd: int  # train rows in another style than the task's (CoIN-ASD files)
    rejected: int
    reasons: dict[str, int]

    def counts(self) -> dict[str, Any]:
        return {
            "train": self.train,
            "test": self.test,
            "asd": self.asd,
            "rejected": self.rejected,
            "reasons": self.reasons,
        }


@dataclass(frozen=True)
class CoINBuild:
    tasks: dict[str, TaskBuild]
    unknown_folders: tuple[str, ...] = ()

    @property
    def sha256(self) -> dict[str, str]:
        return {t: b.file.sha256 for t, b in self.tasks.items()}

    def counts(self) -> dict[str, Any]:
        return {
            "tasks": {t: b.counts() for t, b in self.tasks.items()},
            "unknown_folders": list(self.unknown_folders),
        }


def reason_kind(reason: str) -> str:
    """The reason without its particulars ("image file missing: a/b.jpg" -> "image file missing")."""
    return reason.split(":", 1)[0].strip()


def top_reasons(rejects: Iterable[RejectRecord], n: int = 5) -> dict[str, int]:
    return dict(Counter(reason_kind(r.reason) for r in rejects).most_common(n))


def unknown_task_rejects(cfg: CoINConfig) -> list[RejectRecord]:
    """Folders under annotations/ that are not one of CoIN's eight tasks."""
    ann = cfg.root_path / ANNOTATIONS_DIR
    if not ann.is_dir():
        raise CoINError(f"{ann}: CoIN annotations folder not found (coin.root={cfg.root})")
    out = []
    for p in sorted(ann.iterdir()):
        if p.is_dir() and p.name not in COIN_FOLDERS:
            reason = f"unknown task folder: {p.name!r} is not a CoIN task ({sorted(COIN_FOLDERS)})"
            out.append(RejectRecord(f"folder-{p.name}", p.name, REJECT_STEP, reason, str(p)))
    return out


def build_coin(out_dir: str | Path, cfg: CoINConfig) -> CoINBuild:
    """Write `<out_dir>/<task>.parquet` (train + test), `<out_dir>/<task>.rejects.parquet`, and
    `<out_dir>/images` (a symlink to the image root: record images resolve against it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_root = cfg.image_root_path
    if not image_root.is_dir():
        raise CoINError(f"{image_root}: CoIN image root not found")
    unknown = unknown_task_rejects(cfg)
    if unknown:
        REJECTS.write(unknown, out_dir / UNKNOWN_REJECTS_FILE)
    images = _ImageChecker(image_root, cfg.check_images, cfg.max_image_pixels)
    built: dict[str, TaskBuild] = {}
    for name in cfg.tasks:
        spec = _spec(name)
        load = load_task(spec, cfg, images)
        n_train = sum(r.split == "train" for r in load.records)
        n_test = sum(r.split == "test" for r in load.records)
        if n_train == 0 or n_test == 0:
            raise CoINError(
                f"CoIN task {spec.coin_name}: no usable {'train' if n_train == 0 else 'test'} records "
                f"after loading ({len(load.rejects)} rejected; reasons {top_reasons(load.rejects)})"
            )
        built[name] = TaskBuild(
            task=name,
            coin_name=spec.coin_name,
            file=INSTRUCTIONS.write(load.records, out_dir / f"{name}.parquet"),
            rejects_file=REJECTS.write(load.rejects, out_dir / f"{name}.rejects.parquet"),
            train=n_train,
            test=n_test,
            asd=sum(r.origin == "asd" for r in load.records),
            rejected=len(load.rejects),
            reasons=top_reasons(load.rejects),
        )
    link = out_dir / "images"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(image_root.resolve(), link, target_is_directory=True)
    return CoINBuild(built, tuple(r.task for r in unknown))


def _spec(name: str) -> TaskSpec:
    for t in COIN_TASKS:
        if t.name == name:
            return t
    raise KeyError(f"CoIN has no task {name!r}; tasks: {[t.name for t in COIN_TASKS]}")
