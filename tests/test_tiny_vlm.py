"""The embedded tiny LLaVA: offline build, cache reuse, reload through from_pretrained, tokenizer."""

from __future__ import annotations

import json
import time

import torch

from data_contracts import INSTRUCTIONS
from sefe_core.minicoin import answer_vocabulary
from sefe_core.prepare import ensure_base_model, ensure_benchmark
from sefe_core.vlm import VLMCollator, load_vlm


def test_pretraining_lowers_heldout_loss(small_run) -> None:
    _, _, base = small_run
    assert base.heldout_loss_after < 0.7 * base.heldout_loss_before
    info = json.loads((base.path / "pretrain.json").read_text())
    assert info["parameters"] < 1_000_000


def test_second_call_reuses_the_cache(small_run) -> None:
    cfg, bench, base = small_run
    t = time.perf_counter()
    again, bench2 = ensure_base_model(cfg), ensure_benchmark(cfg)
    assert again.reused and bench2.reused and again.path == base.path and bench2.dir == bench.dir
    assert time.perf_counter() - t < 5


def test_save_reload_identical_logits(small_run, tmp_path) -> None:
    cfg, bench, base = small_run
    model, processor = load_vlm(base.path)
    recs = INSTRUCTIONS.read_records(bench.task_file("04-gqa"))[:4]
    batch = VLMCollator(processor, bench.image_root)(
        [{"image": r.image, "question": r.question, "answer": r.answer} for r in recs]
    )
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again, _ = load_vlm(tmp_path / "copy")
    again.eval()
    with torch.no_grad():
        after = again(**batch).logits
    assert torch.equal(before, after)


def test_every_answer_is_a_known_token_sequence(small_run) -> None:
    cfg, bench, base = small_run
    _, processor = load_vlm(base.path)
    tok = processor.tokenizer
    answers = set(answer_vocabulary())
    for t in bench.tasks:
        answers |= {r.answer for r in INSTRUCTIONS.read_records(bench.task_file(t))}
    for a in sorted(answers):
        ids = tok(" " + a, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, a
        assert tok.decode(ids) == " " + a, a
    single = [a for a in answer_vocabulary() if len(tok(" " + a, add_special_tokens=False)["input_ids"]) == 1]
    assert len(single) >= len(answer_vocabulary()) - 4  # multi-word quadrants are several tokens


def test_questions_have_no_unknown_tokens(small_run) -> None:
    cfg, bench, base = small_run
    _, processor = load_vlm(base.path)
    for t in bench.tasks:
        for r in INSTRUCTIONS.read_records(bench.task_file(t)):
            assert processor.tokenizer.unk_token_id not in processor.tokenizer(r.question)["input_ids"], (
                r.question
            )
