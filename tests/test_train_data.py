"""A task's training data as a memory-mapped `datasets.Dataset`: the same items, batches and
trained adapter as the records encoded in memory, encoded once and reused from its cache files."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from data_contracts import INSTRUCTIONS
from sefe_core.train import TrainConfig, train_task
from sefe_core.train_data import train_dataset
from sefe_core.vlm import EncodedDataset, VLMCollator, load_vlm

TASK = "04-gqa"


def _in_memory(bench) -> list[dict]:
    recs = [r for r in INSTRUCTIONS.read_records(bench.task_file(TASK)) if r.split == "train"]
    return [{"image": r.image, "question": r.question, "answer": r.answer} for r in recs]


def test_memory_mapped_items_equal_in_memory_ones(small_run, tmp_path) -> None:
    _, bench, base = small_run
    _, processor = load_vlm(base.path)
    collator = VLMCollator(processor, bench.image_root)
    samples = _in_memory(bench)
    ref = EncodedDataset(samples, collator)
    ds = train_dataset(bench.task_file(TASK), collator, tmp_path / "cache", "fp")
    assert ds.with_pixels and len(ds) == len(ref) and ds.lengths() == ref.lengths()
    for i in range(len(ref)):
        a, b = ds[i], ref[i]
        assert list(a["input_ids"]) == b["input_ids"] and list(a["labels"]) == b["labels"]
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    files = sorted((tmp_path / "cache").glob("fp-*.arrow"))
    assert files, "encoded once into Arrow files"
    stamps = [f.stat().st_mtime_ns for f in files]
    again = train_dataset(bench.task_file(TASK), collator, tmp_path / "cache", "fp")
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(again) == len(ds)  # reused
    # pixel values computed per batch instead of cached: the same batch
    lazy = train_dataset(bench.task_file(TASK), collator, tmp_path / "cache", "fp", cache_pixels=False)
    assert "image" in lazy[0] and "pixel_values" not in lazy[0]
    b1, b2 = collator([lazy[i] for i in range(5)]), collator([ref[i] for i in range(5)])
    for k in b2:
        torch.testing.assert_close(b1[k], b2[k], rtol=0, atol=0)


def test_training_from_the_parquet_equals_training_from_records(small_run, tmp_path) -> None:
    from data_contracts import INSTRUCTIONS as C

    _, bench, base = small_run
    cfg = TrainConfig.minicoin(max_steps=4, lora_r=4, lora_alpha=8, per_device_train_batch_size=4)
    path = bench.task_file(TASK)
    a = train_task(base.path, [], path, bench.image_root, tmp_path / "a" / f"task-{TASK}", cfg, "lora")
    records = C.read_records(path)
    b = train_task(base.path, [], records, bench.image_root, tmp_path / "b" / f"task-{TASK}", cfg, "lora")
    assert a.train_samples == b.train_samples == sum(r.split == "train" for r in records)
    wa = load_file(str(a.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(b.adapter_dir / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_text_only_records_have_no_image_tokens_and_train_beside_pictures(small_run, tmp_path) -> None:
    """CoIN's ScienceQA has questions without a picture: their prompts carry no image token, a
    batch holds pixel values for its pictured samples only, in order, and the model trains on
    both kinds (the task's Arrow rows keep paths: a pixel column has no value for them)."""
    from dataclasses import replace

    _, bench, base = small_run
    model, processor = load_vlm(base.path)
    collator = VLMCollator(processor, bench.image_root)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    recs = [r for r in INSTRUCTIONS.read_records(bench.task_file(TASK)) if r.split == "train"]
    mixed = [replace(r, image=None) if i % 2 else r for i, r in enumerate(recs)]
    samples = [{"image": r.image, "question": r.question, "answer": r.answer} for r in mixed]
    for with_pixels in (True, False):
        enc = collator.encode(samples[:4], with_pixels=with_pixels)
        counts = [sum(t == image_id for t in e["input_ids"]) for e in enc]
        assert counts[1] == counts[3] == 0 and counts[0] == counts[2] > 0
        # the answer is labelled the same way with or without the picture
        assert (
            enc[1]["labels"][-3:]
            == collator.encode([{**samples[1], "image": recs[1].image}])[0]["labels"][-3:]
        )
        batch = collator.pad(enc)
        assert batch["pixel_values"].shape[0] == 2
        ref = collator.pad(collator.encode([samples[0], samples[2]]))["pixel_values"]
        torch.testing.assert_close(batch["pixel_values"], ref, rtol=0, atol=0)
        loss = model(**batch).loss
        assert torch.isfinite(loss)
    only_text = collator([samples[1], samples[3]])
    assert "pixel_values" not in only_text and torch.isfinite(model(**only_text).loss)

    path = tmp_path / f"{TASK}.parquet"
    tests = [r for r in INSTRUCTIONS.read_records(bench.task_file(TASK)) if r.split == "test"]
    INSTRUCTIONS.write(mixed + tests, path)
    ds = train_dataset(path, collator, tmp_path / "cache", "mixed")
    assert not ds.with_pixels and ds[1]["image"] is None and ds[0]["image"] == recs[0].image
    cfg = TrainConfig.minicoin(max_steps=2, lora_r=4, lora_alpha=8, per_device_train_batch_size=4)
    res = train_task(base.path, [], path, bench.image_root, tmp_path / "run" / f"task-{TASK}", cfg, "lora")
    assert res.global_step == 2 and np.isfinite(res.final_loss)
