"""ASD: selection, rule assembly, contracts, determinism, resume after a kill, validation of
rewriter answers, and the openai backend's request/retry logic (against httpx.MockTransport; the
real-server test is tests/test_rewriter_served.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer
from typer.testing import CliRunner

from data_contracts import INSTRUCTIONS, REJECTS
from sefe_core.asd import ASDConfig, build_request, convert, run_asd, style_table, target_styles
from sefe_core.config import load_config
from sefe_core.registry import task_spec
from sefe_core.rewriter import Material, Rejection, RewriterUnavailable, ServerConfig, validate_material
from sefe_core.rewriter_served import OpenAIRewriter, load_prompt, output_format, parse_reply, question_list
from sefe_core.styles import format_ok, parse_box
from tests.conftest import SMALL
from tests.fake_rewriter import good_reply


def _run_all(bench, out: Path, **cfg) -> dict:
    return {t: run_asd(bench.task_file(t), bench.image_root, out, ASDConfig(**cfg)) for t in bench.tasks}


@pytest.fixture(scope="module")
def full(small_run, tmp_path_factory):
    """Rules ASD of every train record (percent=100) of all 8 small MiniCoIN tasks."""
    _, bench, _ = small_run
    out = tmp_path_factory.mktemp("asd-full")
    return out, _run_all(bench, out, percent=100)


def test_rules_on_all_tasks_pass_contract_and_style_format(small_run, full) -> None:
    _, bench, _ = small_run
    out, results = full
    for task, res in results.items():
        native = task_spec("minicoin", task).native_style
        originals = INSTRUCTIONS.read_records(bench.task_file(task))
        rows = INSTRUCTIONS.read_records(res.data_path)  # contract-validated read
        n_train = sum(r.split == "train" for r in originals)
        assert res.selected == n_train == res.converted + res.rejected
        assert res.rejected == 0, res.reasons
        assert rows[: len(originals)] == originals  # both splits kept, untouched, first
        asd = rows[len(originals) :]
        assert len(asd) == res.converted and all(r.origin == "asd" and r.split == "train" for r in asd)
        by_id = {r.id: r for r in originals}
        for r in asd:
            src = by_id[r.source_id]
            assert r.id == f"{src.id}-asd-{r.style}" and r.image == src.image and r.task == task
            assert r.style in target_styles(native) and r.style != native
            assert format_ok(r.style, r.answer), (r.style, r.answer)
            assert r.question.endswith(
                {
                    "yes_no": "Answer with Yes or No.",
                    "mcq": "directly.",
                    "short": "single word or phrase.",
                    "brief": "about 20 words.",
                    "detail": "about 50 words.",
                }[r.style]
            )
        shares = Counter(r.style for r in asd)
        assert set(shares) == set(target_styles(native)) and max(shares.values()) - min(shares.values()) <= 1
        assert len(REJECTS.read_records(res.rejects_path)) == 0
    assert style_table()["06-grounding"] == ("yes_no", "mcq", "short", "brief", "detail")
    assert style_table()["01-scienceqa"] == ("yes_no", "short", "brief", "detail")


def test_grounding_and_mcq_rows_are_built_as_documented(full) -> None:
    _, results = full
    rows = [r for r in INSTRUCTIONS.read_records(results["06-grounding"].data_path) if r.origin == "asd"]
    for r in rows:
        meta = r.meta_dict
        box = meta["box"]
        if r.style == "mcq":
            opts, idx = meta["asd"]["options"], meta["asd"]["answer_index"]
            assert len(set(opts)) == 4 and all(parse_box(o) for o in opts) and r.answer == "ABCD"[idx]
            assert parse_box(opts[idx]) == box and f"\n{r.answer}. {opts[idx]}\n" in r.question
        if r.style == "short":  # the inverse question: name what is inside the box
            assert r.answer == meta["expression"] and "[" in r.question
        if r.style == "yes_no":
            cand = meta["asd"]["candidate"]
            assert (r.answer == "Yes") == (json.loads(cand) == box)
    sqa = [r for r in INSTRUCTIONS.read_records(results["01-scienceqa"].data_path) if r.origin == "asd"]
    for r in sqa:  # the native mcq's option lines are gone from the converted questions
        assert "\nA. " not in r.question and r.meta_dict["asd"]["answer_text"] == r.meta_dict["answer_text"]


def test_same_seed_identical_files_other_seed_other_selection(small_run, full, tmp_path) -> None:
    _, bench, _ = small_run
    out, results = full
    again = _run_all(bench, tmp_path / "again", percent=100)
    for task, res in results.items():
        assert again[task].data_path.read_bytes() == res.data_path.read_bytes()
        assert again[task].rejects_path.read_bytes() == res.rejects_path.read_bytes()
    a = run_asd(bench.task_file("03-imagenet"), bench.image_root, tmp_path / "s0", ASDConfig(seed=0))
    b = run_asd(bench.task_file("03-imagenet"), bench.image_root, tmp_path / "s1", ASDConfig(seed=1))
    ids = [{r.id for r in INSTRUCTIONS.read_records(x.data_path) if r.origin == "asd"} for x in (a, b)]
    assert a.selected == b.selected == round(24 * 0.2) and ids[0] != ids[1]


def test_rerun_of_a_finished_task_reuses_it(small_run, tmp_path) -> None:
    _, bench, _ = small_run
    first = run_asd(bench.task_file("04-gqa"), bench.image_root, tmp_path, ASDConfig(shard_size=2))
    mtime = first.data_path.stat().st_mtime_ns
    second = run_asd(bench.task_file("04-gqa"), bench.image_root, tmp_path, ASDConfig(shard_size=2))
    assert second.reused and not first.reused and second.converted == first.converted
    assert first.data_path.stat().st_mtime_ns == mtime


def test_no_unknown_token_in_any_asd_row(small_run, full) -> None:
    _, _, base = small_run
    _, results = full
    tok = AutoTokenizer.from_pretrained(base.path)
    for res in results.values():
        for r in INSTRUCTIONS.read_records(res.data_path):
            if r.origin == "asd":
                for text in (r.question, " " + r.answer):
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    assert tok.unk_token_id not in ids, (r.id, text)


_SLOW_RUN = r"""
import sys, time
from sefe_core.asd import ASDConfig, run_asd
from sefe_core.rewriter_rules import RulesRewriter

class SlowRules(RulesRewriter):  # same output as `rules`, slow enough to be killed mid-run
    def rewrite(self, requests, image_root):
        time.sleep(0.4)
        return super().rewrite(requests, image_root)

cfg = ASDConfig(percent=100, shard_size=2)
run_asd(sys.argv[1], sys.argv[2], sys.argv[3], cfg, rewriter=SlowRules(cfg.seed))
"""


def test_killed_run_resumes_without_redoing_finished_shards(small_run, tmp_path) -> None:
    _, bench, _ = small_run
    task, cfg = "04-gqa", ASDConfig(percent=100, shard_size=2)  # 24 rows -> 12 shards
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, str(bench.task_file(task)), str(bench.image_root), str(killed)]
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(killed.glob(f"shards/{task}/*/0*[0-9].parquet"))) < 3:
            assert proc.poll() is None, "the slow run ended before it could be killed"
            assert time.monotonic() < deadline, "no shards appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (killed / f"{task}.parquet").exists()
    before = {p: p.stat().st_mtime_ns for p in killed.glob(f"shards/{task}/*/*.parquet")}
    done = [p for p in before if not p.name.endswith(".rejects.parquet")]
    assert 3 <= len(done) < 12

    resumed = run_asd(bench.task_file(task), bench.image_root, killed, cfg)
    assert resumed.shards == 12 and resumed.shards_reused == len(done)
    for p in done:  # finished shards were read, not rewritten
        assert p.stat().st_mtime_ns == before[p]
    whole = run_asd(bench.task_file(task), bench.image_root, tmp_path / "whole", cfg)
    assert whole.shards_reused == 0
    assert resumed.data_path.read_bytes() == whole.data_path.read_bytes()
    assert resumed.rejects_path.read_bytes() == whole.rejects_path.read_bytes()


# ------------------------------------------------------------------------------------------
# Validation of rewriter answers
# ------------------------------------------------------------------------------------------
def _request(bench, task: str, style: str, i: int = 0):
    rec = [r for r in INSTRUCTIONS.read_records(bench.task_file(task)) if r.split == "train"][i]
    spec = task_spec("minicoin", task)
    return build_request(rec, style, spec.scorer, spec.native_style)


def test_validation_rejects_bad_material(small_run) -> None:
    _, bench, _ = small_run
    mcq = _request(bench, "03-imagenet", "mcq")
    others = [c for c in ("ball", "box", "tent", "ring") if c != mcq.correct][:3]
    assert validate_material(mcq, Material(tuple(others))) is None
    assert "expected 3" in validate_material(mcq, Material(tuple(others[:2])))
    assert "among the distractors" in validate_material(mcq, Material((*others[:2], mcq.correct.upper())))
    assert "duplicate" in validate_material(mcq, Material((others[0], others[1], others[0] + ".")))
    assert "too long" in validate_material(mcq, Material((*others[:2], "word " * 12)))
    brief = _request(bench, "03-imagenet", "brief")
    assert "words" in validate_material(brief, Material((), "Too short."))
    assert validate_material(brief, Material((), " ".join(["word"] * 20))) is None
    box = _request(bench, "06-grounding", "mcq")
    bad = Material(("[0.5, 0.5, 0.2, 0.2]", "[0.1, 0.1, 0.2, 0.2]", "[0.3, 0.3, 0.4, 0.4]"))
    assert "not a valid box" in validate_material(box, bad)
    assert "among the distractors" in validate_material(
        box, Material((box.correct.replace(" ", ""), "[0.1, 0.1, 0.2, 0.2]", "[0.3, 0.3, 0.4, 0.4]"))
    )


def test_parse_reply_keeps_raw_text_and_checks_shape() -> None:
    garbage = "cafe jones 55 garcia user token"
    out = parse_reply(garbage, 3)
    assert len(out) == 3 and all(isinstance(o, Rejection) and o.raw_text == garbage for o in out)
    assert "not valid JSON" in out[0].reason
    good = {"answers": [{"number": 2, "wrong_answers": ["b"], "explanation": ""}]}
    good["answers"].append({"number": 1, "wrong_answers": ["a", "c"], "explanation": "why"})
    fenced = "```json\n" + json.dumps(good) + "\n```"
    m1, m2 = parse_reply(fenced, 2)
    assert m1 == Material(("a", "c"), "why", fenced) and m2.distractors == ("b",)
    assert "2 answers for 3" in parse_reply(json.dumps(good), 3)[0].reason
    good["answers"][0]["number"] = 1
    assert "numbers answers" in parse_reply(json.dumps(good), 2)[0].reason
    good["answers"][0] = {"number": 2, "wrong_answers": "b", "explanation": ""}
    bad, ok = parse_reply(json.dumps(good), 2)[::-1]
    assert isinstance(ok, Material) and "not a list" in bad.reason


def test_reply_schema_bounds_numbers_and_list_lengths(small_run) -> None:
    """What a grammar-constrained server may write: numbers 1..n and as many wrong answers as
    the group asks for (an unbounded schema let `"number": 74` through for 4 questions)."""
    import jsonschema

    from sefe_core.rewriter_served import ReferencePrompt, reference_schema, response_schema

    _, bench, _ = small_run
    group = [_request(bench, "03-imagenet", "mcq", 0), _request(bench, "03-imagenet", "brief", 1)]
    schema = response_schema(group)
    ok = {"answers": [{"number": 1, "wrong_answers": ["a", "b", "c"], "explanation": ""},
                      {"number": 2, "wrong_answers": [], "explanation": "why"}]}  # fmt: skip
    jsonschema.validate(ok, schema)
    for bad in (
        {"answers": [{**ok["answers"][0], "number": 74}, ok["answers"][1]]},
        {"answers": [{**ok["answers"][0], "number": 0}, ok["answers"][1]]},
        {"answers": [{**ok["answers"][0], "wrong_answers": list("abcd")}, ok["answers"][1]]},
        {"answers": ok["answers"][:1]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    listed = ReferencePrompt(Path("p.txt"), "", "<question_list>", "question_list")
    ref = reference_schema(listed, "brief", 2)
    item = {"question_index": 3, "question": "q", "answer": "a", listed.field("brief"): "e"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([item, {**item, "question_index": 1}], ref)
    jsonschema.validate([{**item, "question_index": 1}, {**item, "question_index": 2}], ref)


# ------------------------------------------------------------------------------------------
# openai backend: request shape, grouping per image, retries (no network: MockTransport)
# ------------------------------------------------------------------------------------------
def test_openai_backend_one_request_per_image_with_retries(small_run) -> None:
    _, bench, _ = small_run
    reqs = [_request(bench, "03-imagenet", s, 0) for s in ("yes_no", "mcq", "brief")]
    reqs.append(_request(bench, "03-imagenet", "mcq", 1))
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if len(seen) == 1:
            return httpx.Response(503, text="warming up")
        reply = good_reply(body)
        return httpx.Response(200, json=reply)

    server = ServerConfig(base_url="http://mock/v1", model="m", backoff_s=0.01, max_tokens_per_question=50)
    rw = OpenAIRewriter(server, transport=httpx.MockTransport(handler))
    outcomes = rw.rewrite(reqs, bench.image_root)
    assert rw.stats == {"requests": 3, "retries": 1}  # 2 images -> 2 requests, one retried after 503
    first = next(b for b in seen if b["max_tokens"] > 50)  # the image with 3 questions
    assert first["model"] == "m" and first["max_tokens"] == 150
    assert first["response_format"]["type"] == "json_schema"
    assert first["response_format"]["json_schema"]["schema"]["properties"]["answers"]["minItems"] == 3
    image = first["messages"][1]["content"][0]["image_url"]["url"]
    assert image.startswith("data:image/png;base64,") and first["messages"][0]["role"] == "system"
    rows, rejects = convert(reqs, outcomes, 0, rw.name)
    assert len(rows) + len(rejects) == 4
    assert not rejects, [r.reason for r in rejects]
    assert all(format_ok(r.style, r.answer) for r in rows)

    down = OpenAIRewriter(
        ServerConfig(base_url="http://mock/v1", model="m", backoff_s=0.0, retries=2),
        transport=httpx.MockTransport(lambda r: httpx.Response(502)),
    )
    with pytest.raises(RewriterUnavailable, match=r"http://mock/v1/chat/completions .* after 3 attempt"):
        down.rewrite(reqs, bench.image_root)


# ------------------------------------------------------------------------------------------
# Config and CLI
# ------------------------------------------------------------------------------------------
def test_asd_config_is_strict() -> None:
    assert load_config(None, ["asd.percent=10"]).asd.percent == 10
    for bad in (["asd.percnt=10"], ["asd.percent=0"], ["asd.backend=gpt"], ["asd.server.concurency=2"]):
        with pytest.raises(ValidationError):
            load_config(None, bad)
    with pytest.raises(Exception, match="asd.server.model"):
        OpenAIRewriter(ServerConfig())


def test_cli_asd_prints_reconciled_counts(tmp_path: Path) -> None:
    from flows.cli import app

    sets = [a for s in [f"runs_root={tmp_path}", *SMALL] for a in ("--set", s)]
    res = CliRunner().invoke(app, ["asd", *sets], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "selected 40 = converted 40 + rejected 0" in res.output
    data = tmp_path / "minicoin-demo" / "data"
    assert len(list(data.glob("*.rejects.parquet"))) == 8 and len(list(data.glob("*.asd.json"))) == 8


def test_every_coin_task_has_a_prompt_with_system_user_and_questions(small_run) -> None:
    _, bench, _ = small_run
    for spec in [task_spec("minicoin", t) for t in bench.tasks]:
        prompt = load_prompt(spec.scorer)
        reqs = [_request(bench, spec.name, s) for s in target_styles(spec.native_style)]
        text = prompt.render(question_list(reqs), output_format())
        assert prompt.system and "JSON" in prompt.system and "{" not in prompt.system
        assert "1. Question:" in text and f"{len(reqs)}. Question:" in text and '"wrong_answers"' in text
        assert "{questions}" not in text and "{output_format}" not in text
