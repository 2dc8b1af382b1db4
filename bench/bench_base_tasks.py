"""What a tiny base gives each MiniCoIN task: its zero-shot score, and its score after one task's
LoRA trained from it with the demo's preset (400 samples x 3 epochs, batch 16, r 16).

This is how a base build is judged before it ships: on MiniCoIN's tuning seed (99), never on the
demo's test split (seed 0), one thread per job as in the demo. Per base: the build's probe (from
its pretrain.json) and a row of zero-shot -> trained per task, with the mean of the trained
scores. Figures go to BENCHMARKS.md.

    python bench/bench_base_tasks.py [--base DIR ...] [--tasks 01-scienceqa 06-grounding] [--seed 99]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command_line, load_average, machine, publish, utc_heading  # noqa: E402


def task_scores(base: Path, task: str, seed: int, n_train: int, n_test: int) -> tuple[float, float, float]:
    """(zero-shot, trained, training seconds) of `task` on `base`, in percent."""
    from sefe_core.evaluate import evaluate_stage
    from sefe_core.minicoin import generate_task
    from sefe_core.registry import task_spec
    from sefe_core.stage import stage_model
    from sefe_core.train import TrainConfig, train_task
    from sefe_core.vlm import load_vlm

    spec = task_spec("minicoin", task)
    with tempfile.TemporaryDirectory(prefix="bench-base-") as d:
        images = Path(d) / "images"
        train = generate_task(spec, "train", n_train, seed=seed, image_root=images)
        test = generate_task(spec, "test", n_test, seed=seed, image_root=images)
        model, processor = load_vlm(base)
        zero = evaluate_stage(model, processor, test, spec, "lora", 0, images)
        t0 = time.perf_counter()
        res = train_task(
            base, [], train, images, Path(d) / "lora" / f"task-{task}", TrainConfig.minicoin(), "lora"
        )
        seconds = time.perf_counter() - t0
        model, processor = stage_model(base, [res.task_dir])
        after = evaluate_stage(model, processor, test, spec, "lora", 1, images)
    mean = lambda preds: 100 * sum(p.score for p in preds) / len(preds)  # noqa: E731
    return mean(zero), mean(after), seconds


def main() -> None:
    import torch

    from sefe_core.registry import benchmark_tasks
    from sefe_core.tiny_config import SHIPPED

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, nargs="+", default=[SHIPPED], help="base model directories")
    p.add_argument("--tasks", nargs="+", default=[s.name for s in benchmark_tasks("minicoin")])
    p.add_argument("--seed", type=int, default=99, help="MiniCoIN seed (99: the tuning seed)")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--no-write", action="store_true", help="print only, do not append to BENCHMARKS.md")
    p.add_argument(
        "--section", default="## Base builds: what each MiniCoIN task gets from the base (issue 11)"
    )
    a = p.parse_args()
    torch.set_num_threads(1)  # as the demo trains: one thread per job

    rows = []
    for base in a.base:
        info = json.loads((base / "pretrain.json").read_text())
        scores = {}
        for task in a.tasks:
            scores[task] = task_scores(base, task, a.seed, a.n_train, a.n_test)
            zero, trained, seconds = scores[task]
            print(
                f"{base} {task} zero-shot {zero:.0f} -> trained {trained:.0f} ({seconds:.0f} s)", flush=True
            )
        probe = " / ".join(f"{100 * info['probe'][k]['accuracy']:.0f}" for k in info["probe"])
        mean = sum(v[1] for v in scores.values()) / len(scores)
        cells = " | ".join(f"{z:.0f} -> {t:.0f}" for z, t, _ in scores.values())
        rows.append(f"| `{base}` (builder {info.get('builder_version')}) | {probe} | {cells} | {mean:.1f} |")
        kinds = " / ".join(info["probe"])

    entry = "\n".join([
        utc_heading(),
        "",
        f"Command: `{command_line()}`. MiniCoIN seed {a.seed}, {a.n_train} train / {a.n_test} test per task; "
        f"one LoRA task trained from the base with the demo's preset. Machine: {machine()}. "
        f"Load after: {load_average()}.",
        "",
        "Accuracy %, zero-shot -> right after the task's own training; probe = the build record's held-out "
        f"generic questions ({kinds}).",
        "",
        f"| base | probe | {' | '.join(a.tasks)} | mean trained |",
        "| --- | --- | " + " | ".join("---" for _ in a.tasks) + " | --- |",
        *rows,
    ])  # fmt: skip
    publish(entry, a.section, write=not a.no_write)


if __name__ == "__main__":
    main()
