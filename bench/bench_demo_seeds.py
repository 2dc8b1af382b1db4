"""The embedded default over several seeds: which differences between methods exceed seed noise.

Each seed is a real cold `sefe run` of the default (shipped base; the seed sets the benchmark's
draw, the LoRA init and data order, and ASD's selection), in its own run directory. Per method:
mean and standard deviation over seeds of MFT / MFN / MAA / BWT and of the forgetting split; per
run: wall time; for plain LoRA the numbers the demo's targets are about (every task right after
its own training, MFT, BWT). Figures go to BENCHMARKS.md.

    python bench/bench_demo_seeds.py [--seeds 0 1 2] [--runs-root DIR] [--set key=value ...]
    python bench/bench_demo_seeds.py --set "methods=[lora,reglora,olora]" \
        --runs-root runs/bench-olora --section "## O-LoRA on the embedded default (issue 12)"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_sefe_run import sefe_run  # noqa: E402
from bench.common import load_average, machine, publish, utc_heading  # noqa: E402

METRICS = ("MFT", "MFN", "MAA", "BWT")
SPLIT = ("superficial", "essential")


def run_seed(runs_root: Path, seed: int, sets: list[str], env: dict[str, str]) -> tuple[float, Path]:
    """One cold `sefe run` (bench_sefe_run's runner) of experiment `demo-seed-<seed>`."""
    exp = f"demo-seed-{seed}"
    seeded = [f"{key}={seed}" for key in ("benchmark.minicoin.seed", "train.seed", "asd.seed")]
    seconds, _ = sefe_run(runs_root, [f"experiment={exp}", *seeded, *sets], env)
    return seconds, runs_root / exp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs-root", type=Path, default=ROOT / "runs" / "bench-seeds")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to BENCHMARKS.md")
    p.add_argument(
        "--section", default="## The embedded default over seeds (issue 11)", help="BENCHMARKS.md section"
    )
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    per_seed: list[dict] = []
    walls, loads, lora_rows = [], [], []
    for seed in a.seeds:
        seconds, run_dir = run_seed(a.runs_root, seed, a.sets, env)
        walls.append(seconds)
        loads.append(load_average())
        metrics = json.loads((run_dir / "report" / "metrics.json").read_text())["methods"]
        per_seed.append(metrics)
        acc = json.loads((run_dir / "lora" / "report" / "metrics.json").read_text())
        diag = [row[j] for j, row in enumerate(acc["matrices"]["accuracy"])]
        lora_rows.append((seed, diag))
        print(f"seed {seed}: {seconds:.0f} s", flush=True)
    methods = list(per_seed[0])

    def cell(values: list[float]) -> str:
        vals = [100 * v for v in values if v is not None]
        if not vals:
            return "n/a"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.1f} ± {sd:.1f}"

    rows = []
    for m in methods:
        accs = [s[m]["metrics"]["accuracy"] for s in per_seed]
        split = [s[m]["forgetting_mean"] for s in per_seed]
        rows.append(
            f"| {m} | " + " | ".join(cell([x[k] for x in accs]) for k in METRICS) + " | "
            + " | ".join(cell([x[k] for x in split]) for k in SPLIT) + " |"
        )  # fmt: skip
    tasks = json.loads(
        (a.runs_root / f"demo-seed-{a.seeds[0]}" / "lora" / "report" / "metrics.json").read_text()
    )["tasks"]
    diag_rows = "\n".join(
        f"| {seed} | "
        + " | ".join(f"{100 * v:.0f}" for v in diag)
        + f" | {100 * sum(diag) / len(diag):.1f} |"
        for seed, diag in lora_rows
    )
    cmd = "python bench/bench_demo_seeds.py --seeds " + " ".join(map(str, a.seeds))
    cmd += "".join(f" --set {shlex.quote(s)}" for s in a.sets)
    if a.runs_root != p.get_default("runs_root"):
        cmd += f" --runs-root {shlex.quote(str(a.runs_root))}"
    if a.section != p.get_default("section"):
        cmd += f" --section {shlex.quote(a.section)}"
    entry = f"""{utc_heading()}

Command: `{cmd}`: one cold `sefe run` per seed (benchmark draw, LoRA init/data
order and ASD selection seeded; shipped base). Machine: {machine()}. Wall time per run:
{", ".join(f"{w:.0f} s" for w in walls)} (median {statistics.median(walls):.0f} s). Load after each: {"; ".join(loads)}.

Mean ± standard deviation over {len(a.seeds)} seeds, percent (forgetting: mean over tasks 1..T-1 of
the score lost from stage j to T, split by whether the final answer's content is still right):

| method | MFT | MFN | MAA | BWT | forgetting: superficial | essential |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Plain LoRA, each task right after its own training (accuracy %, the diagonal a[j][j]):

| seed | {" | ".join(tasks)} | MFT |
| --- | {" | ".join("---" for _ in tasks)} | --- |
{diag_rows}"""
    publish(entry, a.section, write=not a.no_write)


if __name__ == "__main__":
    main()
