"""Real CoIN loaders on a small CoIN-layout tree built in a temp dir: exact counts and rejects,
the CoIN-ASD train files, config errors, the cached benchmark directory, ASD (rules backend),
one training step of the tiny model on a CoIN task, and evaluation with the CoIN scorers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from data_contracts import INSTRUCTIONS, REJECTS
from sefe_core.asd import ASDConfig, TooManyRejects, run_asd
from sefe_core.coin import (
    UNKNOWN_REJECTS_FILE,
    CoINConfig,
    CoINError,
    build_coin,
    detect_style,
    parse_options,
)
from sefe_core.config import load_config
from sefe_core.evaluate import evaluate_seen
from sefe_core.prepare import ensure_benchmark, load_benchmark
from sefe_core.registry import benchmark_tasks, task_spec
from sefe_core.scorers import get_scorer, judge
from sefe_core.stage import stage_model
from sefe_core.styles import MCQ_SUFFIX, SHORT_SUFFIX
from sefe_core.train import TrainConfig, train_task

SQA_Q = "Which object is hot?\nContext: N/A\nA. ice\nB. fire\nC. snow"
SQA_TEXT_Q = "How many days are in a week?\nContext: N/A\nA. seven\nB. five"


def _conv(rid: str, image: str, question: str, answer: str) -> dict:
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _test(qid: str, image: str, text: str, **extra) -> dict:
    return {"question_id": qid, "image": image, "text": text, **extra}


def _text_only(rec: dict) -> dict:
    """As CoIN's converter writes a ScienceQA question without a picture: no `image` key, no
    `<image>` line."""
    out = {k: v for k, v in rec.items() if k != "image"}
    if "conversations" in out:
        out["conversations"][0]["value"] = out["conversations"][0]["value"].removeprefix("<image>\n")
    return out


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_coin_root(root: Path) -> Path:
    """A CoIN tree as SEFE organises it: annotations/<Task>/{train,test}.json + ground truth."""
    img = root / "imgs"
    img.mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 30), (32, 32), (24, 36)]):
        Image.new("RGB", (w, h), (30 * i, 100, 200)).save(img / f"p{i}.png")
    Image.new("RGB", (36, 24), (200, 10, 10)).save(img / "j0.jpg", format="JPEG")
    (img / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg at all")
    a = root / "annotations"
    s = f"\n{SHORT_SUFFIX}"

    # 01 ScienceQA: answers from problems.json; one test pid is not in it (-> reject)
    _write(
        a / "ScienceQA/train.json",
        [
            _conv("11", "imgs/p0.png", SQA_Q, "B"),
            _conv("12", "imgs/p1.png", SQA_Q, "A"),
            _text_only(_conv("13", "", SQA_TEXT_Q, "A")),
        ],
    )
    _write(
        a / "ScienceQA/test.json",
        [
            _test("21", "imgs/p0.png", f"<image>\n{SQA_Q}"),
            _test("99", "imgs/p1.png", SQA_Q),
            _text_only(_test("23", "", SQA_TEXT_Q)),
        ],
    )
    problems = {
        "11": {
            "choices": ["ice", "fire", "snow"],
            "answer": 1,
            "solution": "Fire is hot. Ice and snow are cold.",
        },
        "12": {"choices": ["ice", "fire", "snow"], "answer": 0, "solution": "Ice is cold."},
        "21": {"choices": ["ice", "fire", "snow"], "answer": 1, "solution": "Fire is hot."},
        "13": {"choices": ["seven", "five"], "answer": 0, "solution": "A week has seven days."},
        "23": {"choices": ["seven", "five"], "answer": 0, "solution": "A week has seven days."},
    }
    _write(root / "ScienceQA/problems.json", problems)
    # 02 TextVQA: ten answers from the val file
    tq = f"what does the sign say?\nReference OCR token: stop, go{s}"
    _write(
        a / "TextVQA/train.json",
        [_conv("t1", "imgs/p1.png", tq, "stop"), _conv("t2", "imgs/j0.jpg", tq, "go")],
    )
    _write(a / "TextVQA/test.json", [_test(34602, "imgs/p1.png", tq), _test(34603, "imgs/j0.jpg", tq)])
    val = {
        "data": [
            {"question_id": 34602, "answers": ["stop"] * 7 + ["go"] * 3},
            {"question_id": 34603, "answers": ["go"] * 10},
        ]
    }
    _write(root / "TextVQA/TextVQA_0.5.1_val.json", val)
    # 03 ImageNet: single answer
    iq = f"What is the object in the image?{s}"
    _write(
        a / "ImageNet/train.json",
        [_conv("i1", "imgs/p2.png", iq, "goldfish"), _conv("i2", "imgs/p0.png", iq, "tench")],
    )
    _write(a / "ImageNet/test.json", [_test("it1", "imgs/p2.png", iq, answer="goldfish")])
    # 04 GQA: testdev-balanced questions; the corrupt image is in train; test 202 has no truth
    gq = f"Is the cup on the left?{s}"
    _write(
        a / "GQA/train.json",
        [_conv("g1", "imgs/p0.png", gq, "yes"), _conv("g2", "imgs/broken.jpg", gq, "no")],
    )
    _write(a / "GQA/test.json", [_test("201", "imgs/p0.png", gq), _test("202", "imgs/p1.png", gq)])
    _write(root / "GQA/testdev_balanced_questions.json", {"201": {"answer": "no", "isBalanced": True}})
    # 05 VizWiz: a test record whose image does not exist
    vq = f"What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.{s}"
    _write(
        a / "VizWiz/train.json",
        [_conv("v1", "imgs/p1.png", vq, "unanswerable"), _conv("v2", "imgs/p2.png", vq, "a can")],
    )
    _write(
        a / "VizWiz/test.json",
        [
            _test("VizWiz_val_1", "imgs/p1.png", vq, answer="a can"),
            _test("VizWiz_val_2", "imgs/gone.jpg", vq, answer="x"),
        ],
    )
    # 06 Grounding: answer_bbox + size on the test records (boxes in the square-padded frame)
    rq = "Please provide the bounding box coordinate of the region this sentence describes: red car."
    _write(
        a / "Grounding/train.json",
        [
            _conv("r1", "imgs/p0.png", rq, "[0.1, 0.2, 0.5, 0.6]"),
            _conv("r2", "imgs/j0.jpg", rq, "[0.3, 0.3, 0.9, 0.7]"),
        ],
    )
    _write(
        a / "Grounding/test.json",
        [_test("rt1", "imgs/p0.png", rq, answer_bbox="[0.12, 0.25, 0.5, 0.62]", size=[40, 30])],
    )
    # 07 VQAv2
    qq = f"How many dogs are there?{s}"
    _write(a / "VQAv2/train.json", [_conv("q1", "imgs/p0.png", qq, "2"), _conv("q2", "imgs/p1.png", qq, "3")])
    _write(
        a / "VQAv2/test.json",
        [_test("qt1", "imgs/p2.png", qq, answer="2"), _test("qt2", "imgs/p0.png", qq, answer="3")],
    )
    # 08 OCRVQA: one malformed record (three turns) and one with an empty answer
    oq = f"Who wrote this book?{s}"
    bad = _conv("o3", "imgs/p1.png", oq, "x")
    bad["conversations"].append({"from": "human", "value": "more?"})
    _write(
        a / "OCRVQA/train.json",
        [_conv("o1", "imgs/p0.png", oq, "Jane Austen"), bad, _conv("o4", "imgs/p2.png", oq, " ")],
    )
    _write(a / "OCRVQA/test.json", [_test("ot1", "imgs/p1.png", oq, answer="Mark Twain")])
    # not a CoIN task
    _write(a / "Flickr30k/train.json", [_conv("f1", "imgs/p0.png", "Describe.", "A dog.")])
    # the released CoIN-ASD file of TextVQA: two original rows + three converted ones
    _write(
        a / "TextVQA/train_x20.json",
        [
            _conv("t1", "imgs/p1.png", tq, "stop"),
            _conv("t2", "imgs/j0.jpg", tq, "go"),
            _conv(
                "t3",
                "imgs/p1.png",
                "what does the sign say?\nIs the answer stop?\nAnswer with Yes or No.",
                "Yes",
            ),
            _conv(
                "t4", "imgs/p1.png", f"what does the sign say?\nA. go\nB. stop\nC. exit\n{MCQ_SUFFIX}", "B"
            ),
            _conv(
                "t5",
                "imgs/j0.jpg",
                "what does the sign say?\nAnswer the question, then explain your answer briefly.",
                "go. The green sign at the bottom of the picture shows the word go in large white letters.",
            ),
        ],
    )
    return root


# (train, test, rejected, {reason kind: count}) per task
EXPECTED = {
    "01-scienceqa": (3, 2, 1, {"no ground truth": 1}),  # one of each split is text-only
    "02-textvqa": (2, 2, 0, {}),
    "03-imagenet": (2, 1, 0, {}),
    "04-gqa": (1, 1, 2, {"image unreadable": 1, "no ground truth": 1}),
    "05-vizwiz": (2, 1, 1, {"image file missing": 1}),
    "06-grounding": (2, 1, 0, {}),
    "07-vqav2": (2, 2, 0, {}),
    "08-ocrvqa": (1, 1, 2, {"malformed record": 2}),
}


@pytest.fixture(scope="module")
def coin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coin_root(tmp_path_factory.mktemp("coin-data"))


@pytest.fixture(scope="module")
def coin_bench(coin_root: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("coin-runs")
    cfg = load_config(None, [f"runs_root={runs}", "benchmark.name=coin", f"benchmark.coin.root={coin_root}"])
    return cfg, ensure_benchmark(cfg)


def test_loaders_counts_rejects_and_meta(coin_root: Path, tmp_path: Path) -> None:
    build = build_coin(tmp_path, CoINConfig(root=str(coin_root)))
    assert list(build.tasks) == [t.name for t in benchmark_tasks("coin")]
    for task, (n_train, n_test, n_rej, reasons) in EXPECTED.items():
        b = build.tasks[task]
        assert (b.train, b.test, b.rejected, b.reasons, b.asd) == (n_train, n_test, n_rej, reasons, 0), task
        recs = INSTRUCTIONS.read_records(tmp_path / f"{task}.parquet")
        assert b.file.sha256 and len(recs) == n_train + n_test
        rejects = REJECTS.read_records(tmp_path / f"{task}.rejects.parquet")
        assert len(rejects) == n_rej and all(r.step == "load" and r.raw_text for r in rejects)
        spec = task_spec("coin", task)
        for r in recs:
            assert "<image>" not in r.question and r.style == spec.native_style and r.origin == "original"
            if r.image is not None:  # text-only: ScienceQA's 13 and 23
                assert (tmp_path / "images" / r.image).is_file()  # resolves through the images link
            if r.split == "test":  # every reference answer earns full marks from its own scorer
                assert judge(spec, r.answer, r.answer, r.meta_dict).score == 1.0, r.id
    assert build.unknown_folders == ("Flickr30k",)
    (unknown,) = REJECTS.read_records(tmp_path / UNKNOWN_REJECTS_FILE)
    assert "unknown task folder" in unknown.reason and unknown.task == "Flickr30k"
    assert (tmp_path / "images").is_symlink()

    recs = {r.id: r for t in EXPECTED for r in INSTRUCTIONS.read_records(tmp_path / f"{t}.parquet")}
    sqa = recs["01-scienceqa-test-21"]
    assert sqa.answer == "B" and sqa.question == f"{SQA_Q}\n{MCQ_SUFFIX}"
    assert [r.image for r in recs.values() if r.task == "01-scienceqa"].count(None) == 2
    text_only = recs["01-scienceqa-test-23"]
    assert text_only.answer == "A" and text_only.meta_dict["options"] == ["seven", "five"]
    assert recs["01-scienceqa-train-13"].question == SQA_TEXT_Q
    # the reference appends the instruction to every test question, even one that has it
    from sefe_core.kinds import get_kind

    asked = get_kind("scienceqa").coin.test_question(f"{SQA_Q}\n{MCQ_SUFFIX}")
    assert asked == f"{SQA_Q}\n{MCQ_SUFFIX}\n{MCQ_SUFFIX}"
    assert sqa.meta_dict["options"] == ["ice", "fire", "snow"] and sqa.meta_dict["answer_index"] == 1
    assert recs["01-scienceqa-train-11"].meta_dict["solution"].startswith("Fire is hot")
    tv = recs["02-textvqa-test-34602"]
    assert tv.answer == "stop" and len(tv.meta_dict["answers"]) == 10
    assert get_scorer("textvqa").intended("go", tv.answer, tv.meta_dict) == pytest.approx(0.9)
    g = recs["06-grounding-test-rt1"]
    assert g.meta_dict["box"] == [0.12, 0.25, 0.5, 0.62] and g.meta_dict["image_size"] == [40, 30]
    assert get_scorer("grounding").intended("[0.1, 0.25, 0.5, 0.6]", g.answer, g.meta_dict) == 1.0
    assert recs["04-gqa-test-201"].answer == "no"
    rej = {r.id: r.reason for t in EXPECTED for r in REJECTS.read_records(tmp_path / f"{t}.rejects.parquet")}
    assert "gone.jpg" in rej["05-vizwiz-test-VizWiz_val_2"]
    assert "202" in rej["04-gqa-test-202"] and "broken.jpg" in rej["04-gqa-train-g2"]
    assert "2 conversation turns" in rej["08-ocrvqa-train-o3"] and "empty answer" in rej["08-ocrvqa-train-o4"]


def test_released_asd_annotations_and_subsampling(coin_root: Path, tmp_path: Path) -> None:
    cfg = CoINConfig(root=str(coin_root), tasks=("02-textvqa",), train_file="train_x20.json")
    b = build_coin(tmp_path, cfg).tasks["02-textvqa"]
    assert (b.train, b.asd, b.rejected) == (5, 3, 0)
    rows = {
        r.source_id: r
        for r in INSTRUCTIONS.read_records(tmp_path / "02-textvqa.parquet")
        if r.split == "train"
    }
    assert {k: (r.style, r.origin) for k, r in rows.items()} == {
        "t1": ("short", "original"),
        "t2": ("short", "original"),
        "t3": ("yes_no", "asd"),
        "t4": ("mcq", "asd"),
        "t5": ("brief", "asd"),
    }
    assert detect_style("Where is it?\nA. up\nB. down", "A", "short") == "mcq"
    assert detect_style("Is it?\n" + SHORT_SUFFIX, "yes", "short") == "short"  # VQAv2-style yes
    assert parse_options("Q?\nOptions: (A) hot (B) cold") == ["hot", "cold"]
    # deterministic subsample
    one = CoINConfig(root=str(coin_root), tasks=("07-vqav2",), max_train=1, max_test=1)
    ids = [
        [r.id for r in INSTRUCTIONS.read_records(build_coin(tmp_path / d, one).tasks["07-vqav2"].file.path)]
        for d in ("a", "b")
    ]
    assert ids[0] == ids[1] and len(ids[0]) == 2


def test_bad_configs_and_files_are_clear_errors(coin_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="benchmark.coin section"):
        load_config(None, ["benchmark.name=coin"])
    with pytest.raises(ValidationError, match="coin.tasks"):
        CoINConfig(root=str(coin_root), tasks=("09-nope",))
    with pytest.raises(CoINError, match="train_x99.json.*not found"):
        build_coin(
            tmp_path / "x",
            CoINConfig(root=str(coin_root), tasks=("03-imagenet",), train_file="train_x99.json"),
        )
    broken = tmp_path / "broken"
    make_coin_root(broken)
    (broken / "annotations/ImageNet/test.json").write_text("{not json")
    with pytest.raises(CoINError, match="ImageNet/test.json.*not valid JSON"):
        build_coin(tmp_path / "y", CoINConfig(root=str(broken), tasks=("03-imagenet",)))
    # a test record without ground truth when a whole task's test split is gone: clear error
    _write(
        broken / "annotations/GQA/test.json", [{"question_id": "202", "image": "imgs/p1.png", "text": "q"}]
    )
    with pytest.raises(CoINError, match="GQA: no usable test records"):
        build_coin(tmp_path / "z", CoINConfig(root=str(broken), tasks=("04-gqa",)))


def test_ensure_benchmark_caches_and_rebuilds_on_edited_annotations(coin_bench, coin_root: Path) -> None:
    cfg, bench = coin_bench
    assert bench.name == "coin" and bench.dir.name.startswith("coin-") and not bench.reused
    again = ensure_benchmark(cfg)
    assert again.reused and again.dir == bench.dir and again.sha256 == bench.sha256
    loaded = load_benchmark(bench.dir)
    assert loaded.counts["tasks"]["04-gqa"]["rejected"] == 2
    assert loaded.counts["unknown_folders"] == ["Flickr30k"]
    # an edited annotation file (other size / mtime) gives another key
    other = load_config(
        None, [f"runs_root={cfg.runs_root}", "benchmark.name=coin", f"benchmark.coin.root={coin_root}"]
    )
    f = coin_root / "annotations/VQAv2/train.json"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert ensure_benchmark(other).dir != bench.dir
    finally:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ensure_benchmark(cfg).dir == bench.dir  # MiniCoIN-style reuse once the file is back


def test_asd_rules_on_coin_records_rejects_with_reasons(coin_bench, tmp_path: Path) -> None:
    _, bench = coin_bench
    for task in bench.tasks:
        res = run_asd(
            bench.task_file(task), bench.image_root, tmp_path, ASDConfig(percent=100, max_reject_fraction=1.0),
            benchmark="coin",
        )  # fmt: skip
        assert res.selected == EXPECTED[task][0] == res.converted + res.rejected
        rows = INSTRUCTIONS.read_records(res.data_path)
        assert sum(r.origin == "asd" for r in rows) == res.converted
        for r in REJECTS.read_records(res.rejects_path):
            assert r.step == "asd" and r.reason and not r.retryable  # the rules would say the same again
    # under the default limit, a task the rules mostly cannot convert fails, with what to do
    with pytest.raises(TooManyRejects, match="02-textvqa: 2 of 2 selected rows rejected.*asd.backend=openai"):
        run_asd(
            bench.task_file("02-textvqa"),
            bench.image_root,
            tmp_path / "default",
            ASDConfig(percent=100),
            benchmark="coin",
        )


def test_one_training_step_and_evaluation_with_coin_scorers(coin_bench, small_run, tmp_path: Path) -> None:
    _, bench = coin_bench
    _, _, base = small_run
    task = "01-scienceqa"
    res = train_task(
        base.path,
        [],
        bench.task_file(task),
        bench.image_root,
        tmp_path / "lora" / f"task-{task}",
        TrainConfig.minicoin(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1),
        "lora",
    )
    assert res.global_step == 1 and res.train_samples == 3
    model, processor = stage_model(base.path, [res.task_dir], device="cpu")
    preds = evaluate_seen(model, processor, bench, "lora", stage=6, batch_size=4)
    by_task: dict[str, int] = {}
    tests = {r.id: r for t in bench.tasks for r in INSTRUCTIONS.read_records(bench.task_file(t))}
    for p in preds:
        by_task[p.task] = by_task.get(p.task, 0) + 1
        spec, r = task_spec("coin", p.task), tests[p.id]
        s = get_scorer(spec.scorer)
        assert p.reference == r.answer
        assert p.score == s.intended(p.prediction, r.answer, r.meta_dict)
        assert p.score_reference == s.reference(p.prediction, r.answer, r.meta_dict)
    assert by_task == {t: EXPECTED[t][1] for t in bench.tasks[:6]}


def test_missing_ground_truth_file_names_the_option(coin_root: Path, tmp_path: Path) -> None:
    cfg = CoINConfig(root=str(coin_root), tasks=("04-gqa",), gqa_questions="GQA/nope.json")
    with pytest.raises(CoINError, match="nope.json.*benchmark.coin.gqa_questions"):
        build_coin(tmp_path / "a", cfg)
    # switched off: the test records' own `answer` is the truth (GQA's records here have none)
    b = build_coin(tmp_path / "b", CoINConfig(root=str(coin_root), tasks=("07-vqav2",), textvqa_val=None))
    assert b.tasks["07-vqav2"].test == 2
    with pytest.raises(CoINError, match="no usable test records"):
        build_coin(tmp_path / "c", CoINConfig(root=str(coin_root), tasks=("04-gqa",), gqa_questions=None))


def test_sefe_prepare_shows_the_loaded_counts(coin_bench) -> None:
    """The check docs/reproduce-coin.md has users run before GPU time: the counts are CoIN's."""
    from typer.testing import CliRunner

    from flows.cli import app
    from sefe_core.prepare import task_counts

    cfg, bench = coin_bench
    counts = task_counts(bench)
    for task, (n_train, n_test, n_rej, reasons) in EXPECTED.items():
        assert counts[task] == {"train": n_train, "test": n_test, "rejected": n_rej, "reasons": reasons}, task
    res = CliRunner().invoke(
        app, ["prepare", "--set", f"runs_root={cfg.runs_root}", "--set", "benchmark.name=coin",
              "--set", f"benchmark.coin.root={cfg.benchmark.coin.root}"], env={"COLUMNS": "250"},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for task, (n_train, n_test, n_rej, _) in EXPECTED.items():
        (row,) = [ln for ln in res.output.splitlines() if f" {task} " in ln and "│" in ln][:1]
        cells = [c.strip() for c in row.split("│")]
        assert cells[5:8] == [str(n_train), str(n_test), str(n_rej)], row
    assert "Flickr30k" in res.output


def test_loader_rejects_what_it_cannot_stand_behind(tmp_path: Path) -> None:
    """Issue 16: a symlink out of the data root, a header that claims 12000 x 12000, a truncated
    file, a lone surrogate in valid JSON: each its own reject with the file or record named; the
    good records still load and the prepare does not abort."""
    import struct
    import zlib

    root = make_coin_root(tmp_path / "coin")
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "imgs" / "link.png").symlink_to(outside)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)
    (root / "imgs" / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    )
    good = (root / "imgs" / "p0.png").read_bytes()
    (root / "imgs" / "cut.png").write_bytes(good[: len(good) // 2])
    qq = f"How many?\n{SHORT_SUFFIX}"
    recs = json.loads((root / "annotations/VQAv2/train.json").read_text())
    recs += [_conv("v-link", "imgs/link.png", qq, "1"), _conv("v-huge", "imgs/huge.png", qq, "1"),
             _conv("v-cut", "imgs/cut.png", qq, "1")]  # fmt: skip
    text = json.dumps(recs)[:-1] + ', {"id": "v-sur", "image": "imgs/p0.png", "conversations": ' \
        '[{"from": "human", "value": "<image>\\nHow many? \\ud800"}, {"from": "gpt", "value": "1"}]}]'  # fmt: skip
    (root / "annotations/VQAv2/train.json").write_text(text)

    build = build_coin(tmp_path / "out", CoINConfig(root=str(root), tasks=("07-vqav2",)))
    rejects = {
        r.id.rsplit("-", 1)[-1]: r.reason
        for r in REJECTS.read_records(tmp_path / "out" / "07-vqav2.rejects.parquet")
    }
    assert "image outside the image root: imgs/link.png" in rejects["link"]
    assert "image too large: imgs/huge.png (12000x12000" in rejects["huge"]
    assert "image unreadable: imgs/cut.png" in rejects["cut"]
    assert "not valid Unicode" in rejects["sur"]
    assert build.tasks["07-vqav2"].train == 2  # q1 and q2 still load
