"""Throughput of the ASD `openai` rewriter backend against a real local `transformers serve`.

Same records, same server, three ways of talking to it:
  batched+concurrent  all questions of one image in one request, `--concurrency` requests in flight
  per-sample+concurrent  one request per question, `--concurrency` in flight
  per-sample+sequential  one request per question, one at a time (the baseline)
Each mode runs the full `run_asd` (fresh output dir) `--repeats` times, interleaved; the median
wall time gives samples/s (ASD rows decided per second) and HTTP requests/s. The served model is
the tiny LLaVA built untrained, so every reply is garbage of exactly the token budget: the tokens
generated per question are the same in every mode (`max_tokens_per_question`). MiniCoIN has one
question per image; like VQAv2/GQA, the benchmark file gives each image `--per-image` questions
(records re-pointed at a shared image). Figures are appended to BENCHMARKS.md.

    python bench/bench_rewriter.py [--images 24 --per-image 4 --repeats 3 --concurrency 4 --max-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import load_average, machine, medians, publish  # noqa: E402
from data_contracts import INSTRUCTIONS  # noqa: E402
from sefe_core.asd import ASDConfig, run_asd  # noqa: E402
from sefe_core.config import load_config  # noqa: E402
from sefe_core.prepare import ensure_benchmark  # noqa: E402
from sefe_core.rewriter import ServerConfig  # noqa: E402
from sefe_core.rewriter_served import OpenAIRewriter  # noqa: E402
from sefe_core.tiny_vlm import TinyVLMConfig, build_model, build_processor, build_tokenizer, corpus_texts  # noqa: E402
from tests.test_rewriter_served import Served  # noqa: E402

SECTION = (
    "## ASD rewriter: openai backend, batched per image + concurrent vs per sample + sequential (issue 4)"
)
TASK = "07-vqav2"


def shared_image_task(work: Path, images: int, per_image: int) -> tuple[Path, Path]:
    """A task file whose train records come `per_image` to an image (test split kept)."""
    n = images * per_image
    cfg = load_config(
        None, [f"runs_root={work}", f"benchmark.minicoin.n_train={n}", "benchmark.minicoin.n_test=1"]
    )
    bench = ensure_benchmark(cfg)
    recs = INSTRUCTIONS.read_records(bench.task_file(TASK))
    train = [r for r in recs if r.split == "train"]
    shared = [replace(r, image=train[i - i % per_image].image) for i, r in enumerate(train)]
    path = work / f"{TASK}.parquet"
    INSTRUCTIONS.write(shared + [r for r in recs if r.split != "train"], path)
    return path, bench.image_root


def tiny_model(work: Path) -> Path:
    cfg = TinyVLMConfig()
    tok = build_tokenizer(corpus_texts())
    proc, model = build_processor(tok, cfg), build_model(tok, cfg)
    model.save_pretrained(work / "model")
    proc.save_pretrained(work / "model")
    return work / "model"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--per-image", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16, help="generated tokens per question")
    ap.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    command = shlex.join(["python", "bench/bench_rewriter.py", *sys.argv[1:]])

    with tempfile.TemporaryDirectory(prefix="bench-rewriter-") as tmp:
        work = Path(tmp)
        task_file, image_root = shared_image_task(work, args.images, args.per_image)
        model = tiny_model(work)
        load_before = load_average()
        server = Served(model, work / "serve.log")
        try:
            base = dict(
                base_url=server.url, model=str(model), max_tokens_per_question=args.max_tokens, retries=0
            )
            modes = {
                "batched per image + concurrent": dict(group_by_image=True, concurrency=args.concurrency),
                "per sample + concurrent": dict(group_by_image=False, concurrency=args.concurrency),
                "per sample + sequential": dict(group_by_image=False, concurrency=1),
            }
            warm = OpenAIRewriter(ServerConfig(**base))
            run_asd(
                task_file, image_root, work / "warmup", ASDConfig(percent=10, backend="openai"), rewriter=warm
            )
            times: dict[str, list[float]] = {m: [] for m in modes}
            counts: dict[str, tuple[int, int]] = {}
            for rep in range(args.repeats):
                for i, (name, kw) in enumerate(modes.items()):
                    cfg = ASDConfig(percent=100, backend="openai", server=ServerConfig(**base, **kw))
                    rw = OpenAIRewriter(cfg.server)
                    t0 = time.perf_counter()
                    res = run_asd(task_file, image_root, work / f"out-{rep}-{i}", cfg, rewriter=rw)
                    times[name].append(time.perf_counter() - t0)
                    assert res.selected == res.converted + res.rejected
                    counts[name] = (res.selected, rw.stats["requests"])
                    print(f"{name:32s} run {rep + 1}: {times[name][-1]:.2f} s, {counts[name][1]} requests")
        finally:
            server.stop()
        load_after = load_average()

    base_name = "per sample + sequential"
    med_s = medians(times)
    rows = []
    for name in modes:
        med = med_s[name]
        samples, requests = counts[name]
        ratio = med_s[base_name] / med
        rows.append(
            f"| {name} | {samples} | {requests} | {med:.2f} | {samples / med:.1f} | {requests / med:.1f} | {ratio:.2f}x |"
        )
    entry = "\n".join(
        [
            f"`{command}` ({time.strftime('%Y-%m-%d')}; {machine(with_torch=False)}; load average before {load_before}, "
            f"after {load_after}; server `transformers serve` on 127.0.0.1 (OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', '1')}), untrained tiny LLaVA, "
            f"{args.max_tokens} generated tokens per question, {args.images} images x {args.per_image} "
            f"questions of {TASK}, median of {args.repeats} runs)",
            "",
            "| mode | samples | HTTP requests | median s | samples/s | requests/s | speed-up vs sequential |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    publish(entry, SECTION, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
