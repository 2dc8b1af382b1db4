"""MiniCoIN: determinism, CoIN's task order and prompt formats, scene metadata in every record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from data_contracts import INSTRUCTIONS
from sefe_core.minicoin import MiniCoINConfig, build_minicoin
from sefe_core.registry import TaskSpec, benchmark_tasks, register_benchmark, task_spec
from sefe_core.styles import GROUNDING_PREFIX, MCQ_SUFFIX, SHORT_SUFFIX, UNANSWERABLE_SUFFIX

CFG = MiniCoINConfig(n_train=40, n_test=10)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mc") / "a"
    build_minicoin(out, CFG)
    return out


def _records(out: Path, task: str):
    return INSTRUCTIONS.read_records(out / f"{task}.parquet")


def test_task_order_mirrors_coin() -> None:
    tasks = benchmark_tasks("minicoin")
    assert [t.coin_name for t in tasks] == [
        "ScienceQA",
        "TextVQA",
        "ImageNet",
        "GQA",
        "VizWiz",
        "Grounding",
        "VQAv2",
        "OCRVQA",
    ]
    assert [t.name for t in tasks][:3] == ["01-scienceqa", "02-textvqa", "03-imagenet"]
    assert task_spec("minicoin", "06-grounding").native_style == "bbox"
    assert task_spec("minicoin", "01-scienceqa").native_style == "mcq"


def test_registry_rejects_bad_specs() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        TaskSpec("x", "X", "short", "bleu", 4)
    with pytest.raises(ValueError, match="unknown native style"):
        TaskSpec("x", "X", "poem", "gqa", 4)
    with pytest.raises(ValueError, match="duplicate"):
        register_benchmark("dup", (TaskSpec("a", "A", "short", "gqa", 4),) * 2)
    with pytest.raises(KeyError, match="no task"):
        task_spec("minicoin", "09-nope")


def test_same_seed_byte_identical(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    build_minicoin(again, CFG)
    for t in CFG.tasks:
        assert (built / f"{t}.parquet").read_bytes() == (again / f"{t}.parquet").read_bytes(), t
    pngs = sorted(p.relative_to(built) for p in built.rglob("*.png"))
    assert len(pngs) == 8 * 50
    assert all((built / p).read_bytes() == (again / p).read_bytes() for p in pngs)


def test_other_seed_differs(built: Path, tmp_path: Path) -> None:
    other = tmp_path / "c"
    build_minicoin(other, MiniCoINConfig(seed=1, n_train=40, n_test=10))
    assert (built / "03-imagenet.parquet").read_bytes() != (other / "03-imagenet.parquet").read_bytes()


def test_records_are_valid_and_images_exist(built: Path) -> None:
    for spec in benchmark_tasks("minicoin"):
        recs = _records(built, spec.name)
        assert [r.split for r in recs].count("train") == 40 and [r.split for r in recs].count("test") == 10
        for r in recs:
            assert r.style == spec.native_style and r.origin == "original" and r.source_id == r.id
            with Image.open(built / "images" / r.image) as im:
                assert im.size[0] == im.size[1] and 32 <= im.size[0] <= 48
            assert json.loads(r.meta)["image_size"] == list(im.size)


def test_prompt_formats_follow_coin(built: Path) -> None:
    box = re.compile(r"^\[(\d\.\d\d), (\d\.\d\d), (\d\.\d\d), (\d\.\d\d)\]$")
    for r in _records(built, "01-scienceqa"):
        meta = json.loads(r.meta)
        assert r.question.endswith(MCQ_SUFFIX) and "\nContext: " in r.question
        assert r.answer in "ABCD" and meta["options"][meta["answer_index"]] == meta["answer_text"]
        assert f"\n{r.answer}. {meta['answer_text']}\n" in r.question
    for r in _records(built, "02-textvqa"):
        meta = json.loads(r.meta)
        assert "\nReference OCR token: " in r.question and r.question.endswith(SHORT_SUFFIX)
        assert len(meta["answers"]) == 10 and r.answer in meta["ocr_tokens"]
    for r in _records(built, "03-imagenet"):
        assert r.question.startswith("What is the object in the image?")
        assert r.answer == json.loads(r.meta)["objects"][0]["shape"]
    vizwiz = _records(built, "05-vizwiz")
    assert all(UNANSWERABLE_SUFFIX in r.question for r in vizwiz)
    assert any(r.answer == "unanswerable" for r in vizwiz) and any(r.answer != "unanswerable" for r in vizwiz)
    for r in _records(built, "06-grounding"):
        m = box.match(r.answer)
        assert r.question.startswith(GROUNDING_PREFIX) and m, r.answer
        x1, y1, x2, y2 = map(float, m.groups())
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert [x1, y1, x2, y2] == json.loads(r.meta)["box"]
    for r in _records(built, "08-ocrvqa"):
        meta = json.loads(r.meta)
        assert r.answer in {meta["genre"], meta["author"], "yes", "no"}


def test_scene_metadata_matches_answers(built: Path) -> None:
    """The rules rewriter relies on meta; it must describe the scene the answer talks about."""
    for r in _records(built, "07-vqav2"):
        objs = json.loads(r.meta)["objects"]
        if r.question.startswith("How many"):
            assert r.answer == str(len(objs))
        elif r.question.startswith("Is there a "):
            shape = r.question.split("\n")[0][len("Is there a ") : -1]
            assert r.answer == ("yes" if any(o["shape"] == shape for o in objs) else "no")


def test_unknown_task_and_bad_sizes(tmp_path: Path) -> None:
    """Refused with the config itself (tests/test_faults.py: as one-line CLI errors)."""
    with pytest.raises(ValueError, match="09-x"):
        MiniCoINConfig(tasks=("09-x",))
    with pytest.raises(ValueError, match="n_train"):
        MiniCoINConfig(n_train=0)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# Longer sequences: benchmark.minicoin.rounds (issue 17)
# --------------------------------------------------------------------------------------------
ROUND_2 = [
    "09-scienceqa",
    "10-textvqa",
    "11-imagenet",
    "12-gqa",
    "13-vizwiz",
    "14-grounding",
    "15-vqav2",
    "16-ocrvqa",
]


def test_two_rounds_are_sixteen_distinct_tasks_in_order() -> None:
    cfg = MiniCoINConfig(rounds=2)
    first = [t.name for t in benchmark_tasks("minicoin")]
    assert list(cfg.tasks or ()) == first + ROUND_2 == sorted(first + ROUND_2)
    specs = benchmark_tasks("minicoin", 2)
    for a, b in zip(specs[:8], specs[8:], strict=True):
        assert (b.scorer, b.coin_name, b.native_style, b.max_new_tokens) == (
            a.scorer,
            a.coin_name,
            a.native_style,
            a.max_new_tokens,
        )
        assert (a.round, b.round) == (1, 2) and task_spec("minicoin", b.name) == b
    # a lookup by name needs no config; the real CoIN has no second round
    assert task_spec("minicoin", "24-ocrvqa").round == 3
    with pytest.raises(KeyError, match="no task"):
        task_spec("coin", "09-scienceqa")
    with pytest.raises(KeyError, match="no task"):
        task_spec("minicoin", "09-textvqa")  # task 9 is a ScienceQA


def test_rounds_are_validated() -> None:
    for bad in (0, -1, 13):
        with pytest.raises(ValueError, match="rounds must be an integer from 1 to 12"):
            MiniCoINConfig(rounds=bad)
    with pytest.raises(ValueError, match="need benchmark.minicoin.rounds"):
        MiniCoINConfig(tasks=("01-scienceqa", "09-scienceqa"))
    picked = ("09-scienceqa", "02-textvqa")  # a list picks from every round's tasks, in its order
    assert MiniCoINConfig(rounds=2, tasks=picked).tasks == picked
    with pytest.raises(ValueError, match="one round only"):
        benchmark_tasks("coin", 2)


def test_default_benchmark_dumps_and_keys_as_before_rounds() -> None:
    """rounds=1 is not in the dump: the benchmark step's key and the benchmark directory of a
    default config are the ones from before `rounds` existed (values pinned then, when the default
    test split had 100 samples)."""
    from sefe_core import keys
    from sefe_core.config import load_config
    from sefe_core.hashing import config_hash

    cfg = load_config(None, ["benchmark.minicoin.n_test=100"])
    assert cfg.model_dump(mode="json")["benchmark"]["minicoin"] == {
        "seed": 0,
        "n_train": 400,
        "n_test": 100,
        "tasks": [t.name for t in benchmark_tasks("minicoin")],
    }
    assert keys.digest(keys.benchmark_key(cfg, None)) == "22f88d238ec922db"
    mc = cfg.benchmark.minicoin
    assert config_hash({"name": "minicoin", "minicoin": mc.key_fields()}) == "b8f916bd3ef61e8e"
    two = load_config(None, ["benchmark.minicoin.n_test=100", "benchmark.minicoin.rounds=2"])
    assert two.model_dump(mode="json")["benchmark"]["minicoin"]["rounds"] == 2
    assert two.benchmark.task_names[8:] == tuple(ROUND_2)
    assert keys.digest(keys.benchmark_key(two, None)) != "22f88d238ec922db"
    assert set(two.eval.budgets("minicoin", two.benchmark.task_names)) == set(two.benchmark.task_names)


def test_a_round_two_task_is_new_data_in_the_same_format(tmp_path: Path) -> None:
    """Pipeline-free: generate_task on round-2 specs; other seeds than round 1, the same kind,
    format and scorer; ScienceQA and TextVQA ask one question another way."""
    from sefe_core.kinds import get_kind
    from sefe_core.minicoin import generate_task
    from sefe_core.styles import format_ok

    specs = benchmark_tasks("minicoin", 2)
    phrasings = {"scienceqa": "Which object is in the ", "textvqa": "What is written on the sign on the "}
    for first, later in zip(specs[:8], specs[8:], strict=True):
        r1 = generate_task(first, "test", 12, 0, tmp_path)
        r2 = generate_task(later, "test", 12, 0, tmp_path)
        assert [(r.question, r.answer) for r in r1] != [(r.question, r.answer) for r in r2], later.name
        assert (tmp_path / later.name / "test" / "00000.png").read_bytes() != (
            tmp_path / first.name / "test" / "00000.png"
        ).read_bytes()
        kind = get_kind(later.scorer)
        for r in r2:
            meta = json.loads(r.meta)
            assert r.task == later.name and r.style == first.native_style and format_ok(r.style, r.answer)
            assert kind.score(r.answer, r.answer, meta) == 1.0 and kind.content(r.answer, r.answer, meta)
        if later.scorer in phrasings:  # every question type but this one is as in round 1
            asked = [r.question.startswith(phrasings[later.scorer]) for r in r2]
            assert any(asked) and not any(r.question.startswith(phrasings[later.scorer]) for r in r1)


def test_round_two_words_are_in_the_tiny_tokenizer() -> None:
    """The other phrasings use only words the shipped tiny base already has (no <unk>)."""
    import numpy as np
    from tokenizers import Tokenizer

    from sefe_core.kinds import get_kind

    tok = Tokenizer.from_file(str(Path(__file__).parents[1] / "sefe_core/assets/tiny-llava/tokenizer.json"))
    unk = tok.token_to_id("<unk>")
    for key in ("scienceqa", "textvqa"):
        gen = get_kind(key).generate_round
        assert gen is not None
        rng = np.random.default_rng(0)
        for _ in range(30):
            _, q, a, _ = gen(rng, 2)
            assert unk not in tok.encode(q + " " + a).ids, q


def test_rules_asd_converts_the_other_phrasings(tmp_path: Path) -> None:
    """ASD's rules backend (meta-based) writes every target style of a round-2 record."""
    from sefe_core.asd import build_request, convert, target_styles
    from sefe_core.minicoin import generate_task
    from sefe_core.rewriter_rules import RulesRewriter

    rules = RulesRewriter(0)
    for name in ("09-scienceqa", "10-textvqa"):
        spec = task_spec("minicoin", name)
        for rec in generate_task(spec, "train", 12, 0, tmp_path):
            reqs = [
                build_request(rec, s, spec.scorer, spec.native_style)
                for s in target_styles(spec.native_style)
            ]
            rows, rejects = convert(reqs, rules.rewrite(reqs, tmp_path), 0, rules.name)
            assert len(rows) == len(reqs) and not rejects, (rec.question, rejects)
