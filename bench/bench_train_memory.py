"""Peak memory of a task's training data: records held in memory vs a memory-mapped
`datasets.Dataset` (sefe_core/train_data.py), on a synthetic task of `--records` records.

Each mode runs in a fresh process: read the task's train records, encode them, and read every
item once (what one epoch of Trainer does). Memory is sampled every 20 ms from /proc/self/status:
`RssAnon` (the process's own heap: what a task of 100k records must not fill) and `RssFile` (pages
of memory-mapped files, which the kernel can drop). Two processors: the tiny model's (32 px,
pixel values cached in the Arrow files) and a 336 px CLIP processor as LLaVA-1.5's (pixel values
computed per batch; its in-memory baseline would need 1.35 MB a record, so it runs on
`--records-336` records and the per-record figure is given).

    python bench/bench_train_memory.py [--records 100000] [--records-336 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import load_average, machine, publish, utc_heading  # noqa: E402

SECTION = "## Training data of a 100k-record task: memory (issue 12)"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakSampler:
    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for k in self.peak:
                self.peak[k] = max(self.peak[k], _status_kb(k))
            time.sleep(0.02)

    def __enter__(self) -> PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], _status_kb(k))


def make_task(out: Path, records: int, images: int) -> Path:
    """A MiniCoIN-style task: `images` ScienceQA pictures shared by `records` train records with
    their own questions (every record is tokenised and preprocessed on its own)."""
    import numpy as np

    from data_contracts import INSTRUCTIONS, InstructionRecord
    from sefe_core import minicoin
    from sefe_core.registry import task_spec

    spec = task_spec("minicoin", "01-scienceqa")
    base = minicoin.generate_task(spec, "train", images, 0, out / "images")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(records):
        src = base[i % images]
        suffix = f" (copy {int(rng.integers(1000))})"
        recs.append(
            InstructionRecord(
                id=f"r{i:06d}",
                task=src.task,
                split="train",
                image=src.image,
                question=src.question + suffix,
                answer=src.answer,
                style=src.style,
                origin="original",
                source_id=src.id,
                meta=src.meta,
            )  # fmt: skip
        )
    path = out / "task.parquet"
    INSTRUCTIONS.write(recs, path)
    return path


def processor_336(tiny_dir: Path):
    """The tiny model's processor with LLaVA-1.5's 336 px CLIP image settings (patch 14: 576 tokens)."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_dir))
    ip = proc.image_processor
    ip.size = {"shortest_edge": 336}
    ip.crop_size = {"height": 336, "width": 336}
    proc.patch_size = 14
    return proc


def child(mode: str, task: str, image_root: str, res: int, cache: str) -> dict:
    """One measurement, in this (fresh) process."""
    from sefe_core.tiny_config import SHIPPED
    from sefe_core.vlm import VLMCollator

    if res == 336:
        proc = processor_336(SHIPPED)
    else:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(str(SHIPPED))
    collator = VLMCollator(proc, Path(image_root))
    t0 = time.perf_counter()
    with PeakSampler() as s:
        if mode == "in-memory":
            from data_contracts import INSTRUCTIONS
            from sefe_core.vlm import EncodedDataset

            records = [r for r in INSTRUCTIONS.read_records(task) if r.split == "train"]
            samples = [{"image": r.image, "question": r.question, "answer": r.answer} for r in records]
            ds = EncodedDataset(samples, collator)
        else:
            from sefe_core.train_data import train_dataset

            ds = train_dataset(task, collator, cache, fingerprint=f"bench-{res}")
        n = 0
        for i in range(len(ds)):
            item = ds[i]
            n += len(item["input_ids"])
        if mode != "in-memory":
            batch = collator([ds[i] for i in range(min(16, len(ds)))])  # a batch: pixels per batch at 336
            assert batch["pixel_values"].shape[-1] == res
    return {"seconds": time.perf_counter() - t0, "items": len(ds), "tokens": n, **s.peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--records-336", type=int, default=2_000)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", nargs=5, metavar=("MODE", "TASK", "IMAGES", "RES", "CACHE"))
    a = p.parse_args()
    if a.child:
        mode, task, images, res, cache = a.child
        print(json.dumps(child(mode, task, images, int(res), cache)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        big = make_task(tmp / "big", a.records, 2000)
        small = make_task(tmp / "small", a.records_336, 2000)
        print(f"tasks written in {time.perf_counter() - t0:.0f} s")
        rows = []
        for res, task, n in ((32, big, a.records), (336, small, a.records_336), (336, big, a.records)):
            for mode in ("in-memory", "datasets"):
                if mode == "in-memory" and res == 336 and n > a.records_336:
                    continue  # 1.35 MB a record: would not fit
                cache = tmp / f"cache-{res}-{n}"
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    str(task),
                    str(task.parent / "images"),
                    str(res),
                    str(cache),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-3000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((res, n, mode, r))
                print(res, n, mode, r, flush=True)

    lines = [
        utc_heading(),
        "",
        f"Command: `python bench/bench_train_memory.py --records {a.records} --records-336 {a.records_336}`. "
        f"Machine: {machine(with_torch=False)}. Load after: {load_average()}.",
        "",
        "One fresh process per row: read the task's train records, encode them, read every item once.",
        "Peak `RssAnon` = the process's own memory; `RssFile` = touched pages of memory-mapped files.",
        "",
        "| input | records | training data | peak RssAnon MB | peak RssFile MB | peak RssAnon / records, KB | s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res, n, mode, r in rows:
        label = (
            "records in memory (`EncodedDataset`)"
            if mode == "in-memory"
            else "memory-mapped `datasets.Dataset`"
        )
        lines.append(
            f"| {res} px | {n:,} | {label} | {r['RssAnon'] / 1024:.0f} | {r['RssFile'] / 1024:.0f} | "
            f"{r['RssAnon'] / n:.1f} | {r['seconds']:.0f} |"
        )
    by = {(res, n, mode): r for res, n, mode, r in rows}
    ratio = by[(32, a.records, "datasets")]["RssAnon"] / by[(32, a.records, "in-memory")]["RssAnon"]
    lines += ["", f"Memory-mapped / in memory, peak RssAnon at 32 px and {a.records:,} records: {ratio:.2f}."]
    publish("\n".join(lines) + "\n", SECTION, write=not a.no_write)


if __name__ == "__main__":
    main()
