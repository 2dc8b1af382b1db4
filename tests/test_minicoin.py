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
