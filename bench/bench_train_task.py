"""Where one MiniCoIN task's training time goes, and what encoding the samples once buys.

In one process, on the shipped base and one task of the default benchmark: (1) a profile of the
parts of an optimizer step (collating a batch from raw samples, forward + backward + AdamW), and
(2) the whole `train_task` (the demo's preset: 400 samples x 3 epochs at batch 16) with the
samples collated per batch (the baseline: a raw-sample dataset) against `EncodedDataset`
(encoded once, in memory) and the memory-mapped `datasets.Dataset` `train_task` reads a
Parquet as, median of `--repeats` runs each, interleaved. One thread, as a worker runs.

    python bench/bench_train_task.py [--task 04-gqa] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import load_average, machine, publish, utc_heading  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="04-gqa")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)

    import sefe_core.vlm as vlm
    from data_contracts import INSTRUCTIONS
    from sefe_core.adapters import attach_lora
    from sefe_core.config import load_config
    from sefe_core.prepare import ensure_base_model, ensure_benchmark
    from sefe_core.train import train_task

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cfg = load_config(None, [f"runs_root={tmp}"])
    bench, base = ensure_benchmark(cfg), ensure_base_model(cfg)
    recs = [r for r in INSTRUCTIONS.read_records(bench.task_file(a.task)) if r.split == "train"]
    samples = [{"image": r.image, "question": r.question, "answer": r.answer} for r in recs]
    bs = cfg.train.per_device_train_batch_size

    # (1) the parts of a step
    model, processor = vlm.load_vlm(base.path)
    model = attach_lora(model, cfg.train)
    col = vlm.VLMCollator(processor, bench.image_root)
    chunks = [samples[i : i + bs] for i in range(0, 20 * bs, bs)]
    t = time.perf_counter()
    batches = [col(c) for c in chunks]
    collate_ms = 1000 * (time.perf_counter() - t) / len(chunks)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    model.train()

    def step(b: dict) -> None:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()

    for b in batches[:4]:
        step(b)
    t = time.perf_counter()
    for b in batches[4:]:
        step(b)
    step_ms = 1000 * (time.perf_counter() - t) / (len(batches) - 4)

    # (2) the whole task, collated per batch (baseline) vs encoded once
    encoded_cls = vlm.EncodedDataset

    class PerBatch(vlm.SampleDataset):  # the baseline: raw samples, collated in every batch
        def __init__(self, items, collator, chunk=64):  # noqa: ANN001
            super().__init__(items)

    # records in memory (collated per batch, or encoded once), or the task's Parquet: a
    # memory-mapped datasets.Dataset encoded once into Arrow files (sefe_core/train_data.py; its
    # first run encodes, the next ones read the cache, as every method after the first does)
    modes = {
        "collated per batch": (recs, PerBatch),
        "encoded once in memory": (recs, encoded_cls),
        "memory-mapped datasets.Dataset": (bench.task_file(a.task), encoded_cls),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(a.repeats):
        for j, (mode, (data, cls)) in enumerate(modes.items()):
            vlm.EncodedDataset = cls
            t0 = time.perf_counter()
            try:
                res = train_task(base.path, [], data, bench.image_root,
                                 tmp / f"{i}-{j}" / f"task-{a.task}", cfg.train, "lora")  # fmt: skip
            finally:
                vlm.EncodedDataset = encoded_cls
            wall = time.perf_counter() - t0  # the whole call: loading, data, training, saving
            times[mode].append(wall)
            print(f"{mode} {i + 1}/{a.repeats}: {wall:.1f} s ({res.steps_run} steps)", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    rows = "\n".join(f"| {m} | {med[m]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for m, v in times.items())
    entry = f"""{utc_heading()}

Command: `python bench/bench_train_task.py --task {a.task} --repeats {a.repeats}` (shipped base, the
default config's minicoin preset: {len(samples)} samples x {cfg.train.num_train_epochs:g} epochs at batch {bs}, LoRA r {cfg.train.lora_r}).
Machine: {machine()}. Load after: {load_average()}.

One optimizer step of batch {bs}: collating it from raw samples (open + pad the PNGs, CLIP
preprocessing, chat template, tokenising) {collate_ms:.1f} ms; forward + backward + AdamW {step_ms:.1f} ms
(collation = {100 * collate_ms / (collate_ms + step_ms):.0f}% of a step). The step itself is matmul-bound on one core.

| one `train_task` call ({res.steps_run} steps), wall time | median s | runs (s) |
| --- | --- | --- |
{rows}

Against collated per batch: encoded once in memory {med["encoded once in memory"] / med["collated per batch"]:.2f},
memory-mapped {med["memory-mapped datasets.Dataset"] / med["collated per batch"]:.2f} (same batches, same adapter)."""
    publish(entry, "## One MiniCoIN task's training: where the time goes (issue 11)", write=not a.no_write)


if __name__ == "__main__":
    main()
