"""Batched vs one-at-a-time greedy generation on the MiniCoIN test sets (issue 5).

Evaluation is most of a CoIN run's wall time (36 task-evaluations for 8 tasks), and the reference
answers one sample at a time. This measures samples/s of `vlm.generate_answers` with batch size 1
(the reference's way), batched in input order, and batched sorted by prompt length (the default),
checks that all three give the same answers, and appends the figures to BENCHMARKS.md.

    python bench/bench_generation.py                 # default config's benchmark + base model
    python bench/bench_generation.py --model runs/minicoin-demo/base/tiny-llava-<key> --threads 1

On a shared, loaded machine torch's default two threads contend with other processes and every
small op pays for it (batch 1 most of all); `--threads 1` gives steadier figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import command_line, load_average, machine, medians, publish, utc_heading  # noqa: E402
from data_contracts import INSTRUCTIONS  # noqa: E402
from sefe_core.config import load_config  # noqa: E402
from sefe_core.prepare import ensure_base_model, ensure_benchmark  # noqa: E402
from sefe_core.registry import task_spec  # noqa: E402
from sefe_core.vlm import generate_answers, load_vlm  # noqa: E402

SECTION = "## Evaluation: batched greedy generation (issue 5)"


def run_mode(
    model, processor, tasks, image_root: Path, batch_size: int, sort: bool
) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    answers: list[str] = []
    for spec, samples in tasks:
        answers += generate_answers(
            model,
            processor,
            samples,
            image_root=image_root,
            max_new_tokens=spec.max_new_tokens,
            batch_size=batch_size,
            sort_by_length=sort,
        )
    return time.perf_counter() - t0, answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", type=Path, default=None, help="model directory (default: the config's base model)"
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--per-task", type=int, default=None, help="test samples per task (default: all)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's; 1 resists a loaded machine)",
    )
    ap.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config()
    bench = ensure_benchmark(cfg)
    model_dir = args.model or ensure_base_model(cfg).path
    model, processor = load_vlm(model_dir)
    tasks = []
    for name in bench.tasks:
        recs = [r for r in INSTRUCTIONS.read_records(bench.task_file(name)) if r.split == "test"]
        recs = recs[: args.per_task] if args.per_task else recs
        tasks.append(
            (task_spec(bench.name, name), [{"image": r.image, "question": r.question} for r in recs])
        )
    n = sum(len(s) for _, s in tasks)
    modes = {
        "batch 1 (reference)": (1, False),
        f"batch {args.batch_size}, input order": (args.batch_size, False),
        f"batch {args.batch_size}, sorted by length (default)": (args.batch_size, True),
    }
    load_before = load_average()
    run_mode(model, processor, [(s, x[:8]) for s, x in tasks], bench.image_root, 8, True)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    outputs: dict[str, list[str]] = {}
    for r in range(args.runs):
        for mode, (bs, sort) in modes.items():  # interleaved: the shared machine's load hits all modes
            seconds, answers = run_mode(model, processor, tasks, bench.image_root, bs, sort)
            times[mode].append(seconds)
            if mode in outputs and outputs[mode] != answers:
                print(f"warning: {mode} changed its answers between runs", file=sys.stderr)
            outputs[mode] = answers
            print(
                f"run {r + 1}/{args.runs} {mode}: {seconds:.2f} s ({n / seconds:.0f} samples/s)", flush=True
            )
    load_after = load_average()
    med_s = medians(times)
    base = med_s["batch 1 (reference)"]
    reference = outputs["batch 1 (reference)"]
    rows = []
    for mode in modes:
        med = med_s[mode]
        same = sum(a == b for a, b in zip(outputs[mode], reference, strict=True))
        rows.append(
            f"| {mode} | {med:.2f} | {n / med:.0f} | {base / med:.1f}x | {same}/{n} | "
            + ", ".join(f"{t:.2f}" for t in times[mode])
            + " |"
        )
    cmd = command_line()
    entry = "\n".join(
        [
            utc_heading(),
            "",
            f"Command: `{cmd}`. Machine: {machine()}. Load average (1/5/15 min) before: {load_before}; "
            f"after: {load_after} (shared machine).",
            f"Workload: tiny LLaVA `{Path(model_dir).name}`, MiniCoIN test sets, {len(tasks)} tasks, {n} samples, "
            "greedy, each task's max_new_tokens. Median of "
            f"{args.runs} interleaved runs; ratio = samples/s vs batch 1 in the same process.",
            "",
            "| mode | median s | samples/s | ratio vs batch 1 | same answers as batch 1 | runs (s) |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    publish(entry, SECTION, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
