"""Evaluation of the tiny base model: batched answers equal one-at-a-time answers, every answer is
judged by its task's scorer, and predictions round-trip through predictions.parquet."""

from __future__ import annotations

from dataclasses import replace

import pytest

from data_contracts import INSTRUCTIONS, PREDICTIONS
from sefe_core import counters
from sefe_core.evaluate import (
    evaluate_seen,
    evaluate_stage,
    method_predictions,
    predictions_path,
    run_methods,
    select_test_records,
)
from sefe_core.registry import task_spec
from sefe_core.scorers import judge
from sefe_core.vlm import generate_answers, load_vlm


@pytest.fixture(scope="module")
def loaded(small_run):
    cfg, bench, base = small_run
    model, processor = load_vlm(base.path)
    return cfg, bench, model, processor


def test_batched_generation_matches_one_at_a_time(loaded) -> None:
    _, bench, model, processor = loaded
    # ScienceQA prompts differ in length (2-4 options), so length sorting reorders them
    recs = [r for r in INSTRUCTIONS.read_records(bench.task_file("01-scienceqa")) if r.split == "test"]
    recs += [r for r in INSTRUCTIONS.read_records(bench.task_file("06-grounding")) if r.split == "test"]
    samples = [{"image": r.image, "question": r.question} for r in recs]
    samples[1::4] = [{"image": None, "question": s["question"]} for s in samples[1::4]]  # text-only
    kw = dict(image_root=bench.image_root, max_new_tokens=8)
    one = [generate_answers(model, processor, [s], batch_size=1, **kw)[0] for s in samples]
    assert generate_answers(model, processor, samples, batch_size=5, **kw) == one
    assert generate_answers(model, processor, samples, batch_size=5, sort_by_length=False, **kw) == one
    assert generate_answers(model, processor, [], **kw) == []
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, processor, samples, batch_size=0, **kw)


def test_evaluate_stage_judges_every_test_sample(loaded) -> None:
    cfg, bench, model, processor = loaded
    side = processor.tokenizer.padding_side
    for task in ("01-scienceqa", "02-textvqa", "06-grounding"):
        spec = task_spec(cfg.benchmark.name, task)
        records = INSTRUCTIONS.read_records(bench.task_file(task))
        tests = {r.id: r for r in records if r.split == "test"}
        preds = evaluate_stage(model, processor, records, spec, "lora", 3, bench.image_root, batch_size=4)
        assert [p.id for p in preds] == list(tests)  # test split only, in record order
        assert processor.tokenizer.padding_side == side
        for p in preds:
            r = tests[p.id]
            j = judge(spec, p.prediction, r.answer, r.meta_dict)
            assert (p.method, p.stage, p.task, p.style, p.reference) == (
                "lora",
                3,
                task,
                spec.native_style,
                r.answer,
            )
            assert (p.score, p.score_reference, p.format_ok, p.content_ok) == (
                j.score,
                j.score_reference,
                j.format_ok,
                j.content_ok,
            )
            assert 0 <= p.score <= 1 and (p.content_ok or p.score < 1)


def test_evaluate_seen_writes_predictions(loaded, tmp_path) -> None:
    cfg, bench, model, processor = loaded
    out = predictions_path(tmp_path, "sefe", bench.tasks[1])
    assert out == tmp_path / "sefe" / f"task-{bench.tasks[1]}" / "predictions.parquet"
    before = counters.get("generations")
    seen: list[tuple[int, int]] = []
    preds = evaluate_seen(
        model,
        processor,
        bench,
        "sefe",
        2,
        out,
        batch_size={"01-scienceqa": 2},
        max_new_tokens={"02-textvqa": 3},
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1, 2), (2, 2)]
    n_test = cfg.benchmark.minicoin.n_test
    assert len(preds) == 2 * n_test and {p.task for p in preds} == set(bench.tasks[:2])
    assert counters.get("generations") - before == 2 * n_test  # the pipeline's "no work on rerun" proof
    assert PREDICTIONS.read_records(out) == preds
    df = method_predictions(tmp_path, "sefe")
    assert len(df) == 2 * n_test and run_methods(tmp_path) == ["sefe"]
    with pytest.raises(ValueError, match="stage must be in 1..8"):
        evaluate_seen(model, processor, bench, "sefe", 9)


def test_test_records_rejects_foreign_styles(small_run) -> None:
    cfg, bench, _ = small_run
    spec = task_spec(cfg.benchmark.name, "03-imagenet")
    records = INSTRUCTIONS.read_records(bench.task_file("03-imagenet"))
    assert all(r.split == "test" for r in select_test_records(records, spec))
    bad = [replace(r, style="yes_no") if r.split == "test" else r for r in records]
    with pytest.raises(ValueError, match="native style 'short'"):
        select_test_records(bad, spec)
    with pytest.raises(ValueError, match="no original test records"):
        select_test_records([r for r in records if r.split == "train"], spec)


def test_a_long_drifted_answer_is_scored_on_its_full_text(tmp_path) -> None:
    """CoIN's budget (1024 new tokens) lets a drifted answer reach the scorer whole; the task's
    small budget cuts it; generation stops at the end of sequence, not at the budget."""
    from sefe_core.asd import core_question
    from sefe_core.config import COIN_MAX_NEW_TOKENS, load_config
    from sefe_core.prepare import ensure_base_model, ensure_benchmark
    from sefe_core.styles import STYLE_INSTRUCTIONS

    cfg = load_config(None, [f"runs_root={tmp_path}", "benchmark.minicoin.n_test=8"])
    bench, base = ensure_benchmark(cfg), ensure_base_model(cfg)  # the shipped base: it writes sentences
    model, processor = load_vlm(base.path)
    spec = task_spec(cfg.benchmark.name, "03-imagenet")
    records = [r for r in INSTRUCTIONS.read_records(bench.task_file(spec.name)) if r.split == "test"]
    # a model drifted to a verbose style: asked for detail, the base writes sentences
    drifted = [
        replace(r, question=f"{core_question(r, 'short')}\n{STYLE_INSTRUCTIONS['detail']}") for r in records
    ]
    args = (model, processor, drifted, spec, "lora", 1, bench.image_root)
    cut = evaluate_stage(*args, batch_size=4, max_new_tokens=spec.max_new_tokens)
    whole = evaluate_stage(*args, batch_size=4, max_new_tokens=COIN_MAX_NEW_TOKENS)
    assert (
        sum(len(w.prediction) > len(c.prediction) for c, w in zip(cut, whole, strict=True)) >= len(cut) // 2
    )
    for c, w, r in zip(cut, whole, drifted, strict=True):
        assert w.prediction.startswith(c.prediction)  # the same greedy answer, cut or whole
        j = judge(spec, w.prediction, r.answer, r.meta_dict)
        assert (w.score, w.format_ok, w.content_ok) == (j.score, j.format_ok, j.content_ok)
    lengths = [len(processor.tokenizer(w.prediction).input_ids) for w in whole]
    assert max(lengths) < COIN_MAX_NEW_TOKENS // 4, lengths  # stopped at its end of sequence


def test_evaluation_budget_and_dtype_settings() -> None:
    from pydantic import ValidationError

    from sefe_core.config import COIN_MAX_NEW_TOKENS, load_config

    cfg = load_config(None, ["eval.max_new_tokens={06-grounding: 64}"])
    budgets = cfg.eval.budgets(cfg.benchmark.name, cfg.benchmark.task_names)
    assert (
        budgets["06-grounding"] == 64
        and budgets["01-scienceqa"] == task_spec("minicoin", "01-scienceqa").max_new_tokens
    )
    assert set(cfg.eval.budgets("coin", ["02-textvqa"]).values()) == {COIN_MAX_NEW_TOKENS}  # the reference's
    assert load_config(None, ["eval.max_new_tokens=32"]).eval.budgets("minicoin", ["04-gqa"]) == {
        "04-gqa": 32
    }
    for bad in ("eval.max_new_tokens=0", "eval.max_new_tokens={99-nope: 8}", "eval.dtype=int8"):
        with pytest.raises(ValidationError):
            load_config(None, [bad])
    # "auto": float32 on CPU whatever training used, the training dtype on CUDA; a setting wins
    import torch

    cuda = torch.cuda.is_available()
    assert cfg.eval.torch_dtype(train_bf16=True) == ("bfloat16" if cuda else "float32")
    assert cfg.eval.torch_dtype(train_bf16=False) == ("float16" if cuda else "float32")
    assert load_config(None, ["eval.dtype=bfloat16"]).eval.torch_dtype(train_bf16=False) == "bfloat16"
