"""`asd.recipe` (full | reference), `asd.mode` (add | replace) and prompts in the reference's
layout (`asd.server.prompt_dir` at a folder laid out like jinpeng0528/SEFE's CoIN-ASD/prompts:
<Task>/<style>.txt, ScienceQA's split into _w_image/_wo_image). The prompt texts here are our own,
written for these tests; only the layout, the placeholders and the reply shapes are the
reference's. The served model is tests/fake_rewriter.py's real local HTTP server."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from data_contracts import INSTRUCTIONS, REJECTS, sha256_file
from sefe_core import keys
from sefe_core.asd import ASD_VERSION, ASDConfig, build_request, convert, run_asd, style_table
from sefe_core.config import load_config
from sefe_core.hashing import config_hash
from sefe_core.kinds import KINDS
from sefe_core.prepare import ensure_benchmark
from sefe_core.registry import task_spec
from sefe_core.rewriter import Material, Rejection, RewriterError, ServerConfig
from sefe_core.rewriter_rules import RulesRewriter
from sefe_core.rewriter_served import OpenAIRewriter, load_reference_prompt, parse_reference_reply
from sefe_core.styles import format_ok
from tests.conftest import small_config
from tests.fake_rewriter import FakeRewriter

FOUR = ("yes_no", "mcq", "brief", "detail")
TWO = ("brief", "detail")
REFERENCE_TABLE = {
    "01-scienceqa": TWO,
    "02-textvqa": FOUR,
    "03-imagenet": TWO,
    "04-gqa": FOUR,
    "05-vizwiz": FOUR,
    "06-grounding": TWO,
    "07-vqav2": FOUR,
    "08-ocrvqa": FOUR,
}
FULL_TABLE = {
    "01-scienceqa": ("yes_no", "short", "brief", "detail"),
    **{t: FOUR for t in ("02-textvqa", "03-imagenet", "04-gqa", "05-vizwiz", "07-vqav2", "08-ocrvqa")},
    "06-grounding": ("yes_no", "mcq", "short", "brief", "detail"),
}


# ------------------------------------------------------------------------------------------
# A prompt folder in the reference's layout, with our own texts
# ------------------------------------------------------------------------------------------
ASK = {
    "yn": "write one answer that sounds right but is wrong",
    "mcq": "write three answers that sound right but are wrong",
    "brief": "say in about 20 words why the answer is right",
    "detail": "say in about 50 words why the answer is right, naming what in the image shows it",
}
SYSTEM = "<SYSTEM PROMPT>\nYou write training material for a picture question answering assistant.\n\n"


def _list_prompt(style: str) -> str:
    return (
        f"{SYSTEM}<USER PROMPT>\nBelow are questions about one picture with their right answers. "
        f"For each one, {ASK[style]}.\n\n<question_list>\n\nAnswer with a JSON list, one entry per "
        'question, carrying its "question_index".\n'
    )


def _row_prompt(style: str, lead: str = "") -> str:
    return (
        f"{SYSTEM}<USER PROMPT>\n{lead}The question:\n<question>\nIts right answer is '<answer>'. "
        f"Please {ASK[style]}.\nAnswer with one JSON object.\n"
    )


def write_reference_layout(root: Path) -> Path:
    """Every task and style the reference has prompts for, in its layout, with texts of ours."""
    for task in ("GQA", "VQAv2", "OCRVQA"):  # all questions of an image in one request
        for style in ASK:
            _write(root / task / f"{style}.txt", _list_prompt(style))
    for task in ("TextVQA", "VizWiz"):  # one question a request
        for style in ASK:
            _write(root / task / f"{style}.txt", _row_prompt(style))
    for style in ("brief", "detail"):
        _write(root / "ScienceQA" / f"{style}_w_image.txt", _row_prompt(style, "PICTURE GIVEN. "))
        _write(root / "ScienceQA" / f"{style}_wo_image.txt", _row_prompt(style, "NO PICTURE. "))
        _write(
            root / "ImageNet" / f"{style}.txt",
            f"{SYSTEM}<USER PROMPT>\nThis photo shows a '<gt_category>'; {ASK[style]}. One JSON object.\n",
        )
        _write(
            root / "Grounding" / f"{style}.txt",
            f"{SYSTEM}<USER PROMPT>\nRegions of the picture, each with its box:\n<target_list>\n"
            f"Describe each region in about {20 if style == 'brief' else 50} words. A JSON list.\n",
        )
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The small MiniCoIN of the test suite (24 train records a task, one image each)."""
    return ensure_benchmark(small_config(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def fake():
    with FakeRewriter() as server:
        yield server


def _served(fake: FakeRewriter, prompt_dir: Path | str | None, **cfg) -> ASDConfig:
    server = ServerConfig(
        base_url=fake.url, model="fake", backoff_s=0.01, retries=1, prompt_dir=prompt_dir and str(prompt_dir)
    )
    return ASDConfig(backend="openai", server=server, **cfg)


def _asd_rows(res) -> list:
    return [r for r in INSTRUCTIONS.read_records(res.data_path) if r.origin == "asd"]


def _text(body: dict) -> str:
    return body["messages"][-1]["content"][-1]["text"]


def _has_image(body: dict) -> bool:
    return any(part["type"] == "image_url" for part in body["messages"][-1]["content"])


# ------------------------------------------------------------------------------------------
# The recipe table
# ------------------------------------------------------------------------------------------
def test_recipe_tables_for_coin_and_minicoin() -> None:
    for benchmark in ("minicoin", "coin"):
        assert style_table(benchmark, "reference") == REFERENCE_TABLE
        assert style_table(benchmark, "full") == style_table(benchmark) == FULL_TABLE
    assert {k.coin_name for k in KINDS.values()} == {
        "ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA",
    }  # fmt: skip
    assert load_config(None, ["asd.recipe=reference"]).asd.recipe == "reference"
    for bad in (["asd.recipe=paper"], ["asd.mode=append"]):
        with pytest.raises(ValidationError):
            load_config(None, bad)


def test_reference_recipe_selects_the_same_rows_in_equal_shares_of_its_styles(bench, tmp_path) -> None:
    task = "06-grounding"
    full = run_asd(bench.task_file(task), bench.image_root, tmp_path / "full", ASDConfig(percent=50))
    ref_cfg = ASDConfig(percent=50, recipe="reference")
    ref = run_asd(bench.task_file(task), bench.image_root, tmp_path / "ref", ref_cfg)
    again = run_asd(bench.task_file(task), bench.image_root, tmp_path / "again", ref_cfg)
    assert ref.key != full.key and ref.rejected == 0 and ref.converted == full.converted == 12
    rows, full_rows = _asd_rows(ref), _asd_rows(full)
    assert {r.source_id for r in rows} == {r.source_id for r in full_rows}  # the same records chosen
    assert Counter(r.style for r in rows) == {"brief": 6, "detail": 6}
    assert again.data_path.read_bytes() == ref.data_path.read_bytes()  # deterministic
    assert set(ref.per_style) == {"brief", "detail"}


def test_the_defaults_keep_todays_key_and_the_settings_change_the_step_key(bench, tmp_path) -> None:
    task = bench.task_file("03-imagenet")
    res = run_asd(task, bench.image_root, tmp_path, ASDConfig())
    today = {  # the key as run_asd computed it before asd.recipe / asd.mode existed
        "version": ASD_VERSION,
        "input": sha256_file(task),
        "percent": 20.0,
        "seed": 0,
        "shard_size": 64,
        "rewriter": RulesRewriter(0).fingerprint(),
    }
    assert res.key == config_hash(today)
    ref = run_asd(task, bench.image_root, tmp_path, ASDConfig(recipe="reference"))
    assert ref.key != res.key and not ref.reused
    # the flow's cache key of the asd step (the whole asd section) changes with either setting
    base = keys.digest(keys.asd_key(load_config(None, []), "03-imagenet", "sha"))
    for change in ("asd.recipe=reference", "asd.mode=replace"):
        assert keys.digest(keys.asd_key(load_config(None, [change]), "03-imagenet", "sha")) != base


# ------------------------------------------------------------------------------------------
# asd.mode: add | replace
# ------------------------------------------------------------------------------------------
def test_replace_mode_puts_each_converted_row_in_its_source_place(bench, tmp_path) -> None:
    task = bench.task_file("04-gqa")
    originals = INSTRUCTIONS.read_records(task)
    added = run_asd(task, bench.image_root, tmp_path, ASDConfig(percent=50, shard_size=4))
    added_bytes, added_rows = added.data_path.read_bytes(), INSTRUCTIONS.read_records(added.data_path)
    assert added_rows[: len(originals)] == originals and len(added_rows) == len(originals) + 12
    replaced = run_asd(task, bench.image_root, tmp_path, ASDConfig(percent=50, shard_size=4, mode="replace"))
    # same shards, reassembled: nothing was sent to the rewriter again
    assert replaced.key == added.key and not replaced.reused and replaced.shards_reused == replaced.shards
    rows = INSTRUCTIONS.read_records(replaced.data_path)
    assert len(rows) == len(originals) and replaced.converted == 12
    converted = {r.source_id: r for r in added_rows if r.origin == "asd"}
    for orig, row in zip(originals, rows, strict=True):
        assert row == converted.get(orig.id, orig)
    assert sum(r.origin == "asd" for r in rows) == 12
    assert [r for r in rows if r.split == "test"] == [r for r in originals if r.split == "test"]
    manifest = json.loads(replaced.manifest_path.read_text())
    assert manifest["mode"] == "replace" and manifest["config"]["mode"] == "replace"
    # and back: the add file again, byte for byte
    back = run_asd(task, bench.image_root, tmp_path, ASDConfig(percent=50, shard_size=4))
    assert back.data_path.read_bytes() == added_bytes and back.shards_reused == back.shards


def test_replace_mode_keeps_the_source_of_a_rejected_row(bench, tmp_path) -> None:
    class HalfRejected(RulesRewriter):
        def rewrite(self, requests, image_root):
            out = super().rewrite(requests, image_root)
            return [Rejection("no") if i % 2 else o for i, o in enumerate(out)]

    task = bench.task_file("02-textvqa")
    cfg = ASDConfig(percent=50, mode="replace", retry_rejects="none")
    res = run_asd(task, bench.image_root, tmp_path, cfg, rewriter=HalfRejected(0))
    rows, originals = INSTRUCTIONS.read_records(res.data_path), INSTRUCTIONS.read_records(task)
    assert res.rejected == res.converted == 6 and len(rows) == len(originals)
    rejected = {r.id.split("-asd-")[0] for r in REJECTS.read_records(res.rejects_path)}
    by_id = {r.id: r for r in rows}
    assert rejected and all(by_id[i].origin == "original" for i in rejected)


# ------------------------------------------------------------------------------------------
# Prompts in the reference's layout, against a real (fake) server
# ------------------------------------------------------------------------------------------
def test_reference_layout_end_to_end_on_every_task(bench, fake, tmp_path) -> None:
    prompts = write_reference_layout(tmp_path / "CoIN-ASD" / "prompts")
    for prompt_dir in (prompts, tmp_path):  # the prompt folder itself, or a checkout holding it
        assert OpenAIRewriter(_served(fake, prompt_dir).server).reference == prompts
    out = tmp_path / "run"
    for task, styles in REFERENCE_TABLE.items():
        start = len(fake.bodies)
        cfg = _served(fake, tmp_path, percent=100, recipe="reference")
        res = run_asd(bench.task_file(task), bench.image_root, out, cfg)
        bodies = fake.bodies[start:]
        assert res.selected == 24 == res.converted and res.rejected == 0, (task, res.reasons)
        rows = _asd_rows(res)
        shares = Counter(r.style for r in rows)
        assert set(shares) == set(styles) and max(shares.values()) - min(shares.values()) <= 1, task
        assert all(format_ok(r.style, r.answer) for r in rows)
        # one request per row that needs the model (one image per row here; yes/no answers need none)
        binary = [r for r in rows if r.meta_dict["asd"]["answer_text"].lower() in ("yes", "no")]
        needs = [r for r in rows if not (r in binary and r.style in ("yes_no", "mcq"))]
        assert len(bodies) == len(needs), task
        assert all(b["messages"][0]["content"].startswith("You write training material") for b in bodies)
        texts = [_text(b) for b in bodies]
        assert not any(
            f"<{p}>" in t for t in texts for p in ("question_list", "target_list", "question", "answer")
        )
        kind = task_spec("minicoin", task).scorer
        if kind in ("gqa", "vqav2", "ocrvqa"):  # list prompts: a JSON list of question_index entries
            assert all("1. Question: " in t and "\n   Answer: " in t for t in texts)
            assert all(b["response_format"]["json_schema"]["schema"]["type"] == "array" for b in bodies)
        if kind == "scienceqa":  # rows with an image get the _w_image prompts
            assert all(
                t.startswith("PICTURE GIVEN.") and _has_image(b) for t, b in zip(texts, bodies, strict=True)
            )
        if kind == "grounding":
            assert all(t.startswith("Regions of the picture") and "1. " in t and ": [" in t for t in texts)
        if kind == "imagenet":
            assert all(f"shows a '{r.meta_dict['asd']['answer_text']}'" in "".join(texts) for r in rows)
        for r in rows:  # the explanation the model wrote follows the answer
            if r.style in ("brief", "detail"):
                assert "outline and the flat colour" in r.answer
        if kind == "vqav2":  # a yes/no question's two-option mcq: the other answer, no request
            two = [r for r in binary if r.style == "mcq"]
            assert two and all(len(r.meta_dict["asd"]["options"]) == 2 for r in two)


def test_list_prompts_take_every_row_of_an_image_and_style_in_one_request(bench, fake, tmp_path) -> None:
    prompts = write_reference_layout(tmp_path)
    rec = next(r for r in INSTRUCTIONS.read_records(bench.task_file("04-gqa")) if r.split == "train")
    other = dataclasses.replace(rec, id=rec.id + "-b", question="Which shape is in the picture?")
    reqs = [build_request(r, s, "gqa", "short") for s in ("mcq", "brief") for r in (rec, other)]
    rw = OpenAIRewriter(_served(fake, prompts).server)
    start = len(fake.bodies)
    outcomes = rw.rewrite(reqs, bench.image_root)
    bodies = fake.bodies[start:]
    assert len(bodies) == 2  # one per style: mcq, brief
    assert sorted(b["response_format"]["json_schema"]["schema"]["minItems"] for b in bodies) == [2, 2]
    assert all("2. Question: Which shape is in the picture?" in _text(b) for b in bodies)
    rows, rejects = convert(reqs, outcomes, 0, rw.name)
    assert len(rows) == 4 and not rejects, [r.reason for r in rejects]


def test_a_row_without_image_gets_the_wo_image_prompt_and_no_image(bench, fake, tmp_path) -> None:
    prompts = write_reference_layout(tmp_path)
    rec = next(r for r in INSTRUCTIONS.read_records(bench.task_file("01-scienceqa")) if r.split == "train")
    text_only = dataclasses.replace(rec, image=None)
    reqs = [build_request(r, "detail", "scienceqa", "mcq") for r in (rec, text_only)]
    reqs[1] = dataclasses.replace(reqs[1], id=reqs[1].id + "-text")
    rw = OpenAIRewriter(_served(fake, prompts).server)
    start = len(fake.bodies)
    outcomes = rw.rewrite(reqs, bench.image_root)
    with_image, without = sorted(fake.bodies[start:], key=lambda b: not _has_image(b))
    assert _has_image(with_image) and _text(with_image).startswith("PICTURE GIVEN.")
    assert not _has_image(without) and _text(without).startswith("NO PICTURE.")
    assert all(isinstance(o, Material) and len(o.explanation.split()) == 50 for o in outcomes)


def test_our_own_layout_in_prompt_dir_keeps_working(bench, fake, tmp_path) -> None:
    ours = tmp_path / "ours"
    ours.mkdir()
    for key, kind in KINDS.items():
        shutil.copy(kind.prompt_path, ours / f"{key}.txt")
    shutil.copy(Path(__file__).parents[1] / "sefe_core" / "prompts" / "output_format.txt", ours)
    cfg = _served(fake, ours, percent=50)
    assert OpenAIRewriter(cfg.server).reference is None
    res = run_asd(bench.task_file("03-imagenet"), bench.image_root, tmp_path / "run", cfg)
    assert res.converted == 12 and res.rejected == 0


def test_changing_a_reference_prompt_changes_the_key(fake, tmp_path) -> None:
    prompts = write_reference_layout(tmp_path)
    before = OpenAIRewriter(_served(fake, prompts).server).fingerprint()
    (prompts / "VizWiz" / "mcq.txt").write_text(_row_prompt("mcq", "Careful now. "))
    after = OpenAIRewriter(_served(fake, prompts).server).fingerprint()
    assert before["prompts"] != after["prompts"] and before["name"] == after["name"]


# ------------------------------------------------------------------------------------------
# Bad folders and bad replies
# ------------------------------------------------------------------------------------------
def test_bad_prompt_folders_are_clear_errors(bench, fake, tmp_path) -> None:
    with pytest.raises(RewriterError, match=r"prompt_dir=.*nowhere is not a directory"):
        OpenAIRewriter(_served(fake, tmp_path / "nowhere").server)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewriterError, match=r"holds no prompts: neither our layout .* nor the reference's"):
        OpenAIRewriter(_served(fake, tmp_path / "empty").server)

    prompts = write_reference_layout(tmp_path / "ref")
    start = fake.requests
    # the full recipe needs ImageNet yes/no and mcq prompts, which the reference does not have
    cfg = _served(fake, prompts, percent=50)
    with pytest.raises(
        RewriterError,
        match=r"ImageNet/(yn|mcq)\.txt .*not found in asd\.server\.prompt_dir=.*asd\.recipe=reference",
    ) as err:
        run_asd(bench.task_file("03-imagenet"), bench.image_root, tmp_path / "run", cfg)
    assert "rerun the same command" not in str(err.value)  # found before the first shard
    assert fake.requests == start and not (tmp_path / "run" / "03-imagenet.parquet").exists()

    (prompts / "VQAv2" / "yn.txt").write_text("Write a wrong answer for <question_list>.")
    with pytest.raises(RewriterError, match=r"VQAv2/yn\.txt must have a <SYSTEM PROMPT> section"):
        run_asd(
            bench.task_file("07-vqav2"),
            bench.image_root,
            tmp_path / "run",
            _served(fake, prompts, percent=50),
        )
    (prompts / "VQAv2" / "yn.txt").write_text(f"{SYSTEM}<USER PROMPT>\n<question_list> with <options>\n")
    with pytest.raises(RewriterError, match=r"VQAv2/yn\.txt: .*\['options', 'question_list'\]"):
        load_reference_prompt(prompts / "VQAv2" / "yn.txt")
    assert fake.requests == start


def test_reference_replies_are_parsed_by_their_shape(tmp_path) -> None:
    _write(tmp_path / "l.txt", _list_prompt("mcq"))
    _write(tmp_path / "r.txt", _row_prompt("yn"))
    listed, row = load_reference_prompt(tmp_path / "l.txt"), load_reference_prompt(tmp_path / "r.txt")
    assert listed.listed == "question_list" and row.listed is None
    # the reference's own example style: a fence, // comments, trailing commas
    text = (
        '```json\n[\n  {"question_index": 2, "distractor_options": ["a", "b", "c"],},\n'
        '  // the next one\n  {"question_index": 1, "distractor_options": ["d", "e", "f"]},\n]\n```'
    )
    first, second = parse_reference_reply(text, listed, "mcq", 2)
    assert first == Material(("d", "e", "f"), "", text) and second.distractors == ("a", "b", "c")
    assert "2 entries for 3" in parse_reference_reply(text, listed, "mcq", 3)[0].reason
    bad = parse_reference_reply('[{"question_index": 1, "distractor_options": "x"}]', listed, "mcq", 1)[0]
    assert isinstance(bad, Rejection) and bad.retryable and "not a list of strings" in bad.reason
    wrapped = parse_reference_reply(
        '{"items": [{"question_index": 1, "distractor_options": []}]}', listed, "mcq", 1
    )
    assert wrapped == [Material((), "", '{"items": [{"question_index": 1, "distractor_options": []}]}')]
    assert parse_reference_reply('{"distractor_option": "maybe"}', row, "yes_no", 1)[0].distractors == (
        "maybe",
    )
    nope = parse_reference_reply("Sure! maybe.", row, "yes_no", 1)[0]
    assert isinstance(nope, Rejection) and nope.retryable and "not valid JSON" in nope.reason
