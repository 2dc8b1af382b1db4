"""A 16-task sequence (`benchmark.minicoin.rounds=2`): what RegLoRA's mask accumulation costs.

One cold `sefe run` with rounds=2 and methods lora, reglora into its own run directory, then,
per task k, from the stored files:

- RegLoRA's penalty per optimizer step: forward + backward of `masked_regularizer` on task k's
  saved LoRA factors against masks R_1..R_{k-1} (median of `--calls` calls after warm-up, one
  torch thread as a CPU training worker has; task 1 has no penalty);
- the masks' memory in the penalty (MultisetIndex bytes, all modules);
- the share of the multiset's entries at positions masked by more than one earlier task
  (R_1 ⊎ … ⊎ R_{k-1} counted by multiplicity);
- plasticity: accuracy on task k right after learning it (the accuracy matrix's diagonal),
  RegLoRA and plain LoRA; and the final MFN / BWT of both.

    python bench/bench_long_sequence.py [--runs-root runs/bench-long-sequence] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_sefe_run import sefe_run  # noqa: E402
from bench.common import load_average, machine, publish, utc_heading  # noqa: E402
from sefe_core.minicoin import MiniCoINConfig  # noqa: E402

SECTION = "## A 16-task sequence: what mask accumulation costs (issue 17)"
EXPERIMENT = "long-sequence"
MASK_FILE = "mask.safetensors"


def penalty_figures(task_dir: Path, prior_dirs: list[Path], calls: int) -> dict[str, float]:
    """Median forward+backward seconds of the penalty, mask bytes, share of repeated entries."""
    import torch

    from sefe_core.adapters import LoraFactors, adapter_factors
    from sefe_core.regularizer import masked_regularizer

    factors = [
        LoraFactors(name, a.float().requires_grad_(), b.float().requires_grad_())
        for name, a, b in adapter_factors(task_dir / "adapter")
    ]
    reg = masked_regularizer(factors, [str(d / MASK_FILE) for d in prior_dirs])
    times = []
    for i in range(calls + 3):  # three warm-up calls
        for f in factors:
            f.a.grad = f.b.grad = None
        t0 = time.perf_counter()
        reg().backward()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    index = reg.index or {}
    size = sum(ix.size for ix in index.values())
    # entries at a position chosen by c >= 2 tasks: its c - 1 repeats in `extra` and its one in `unique`
    repeated = sum(ix.extra.numel() + torch.unique(ix.extra).numel() for ix in index.values())
    return {"seconds": statistics.median(times), "bytes": reg.mask_nbytes, "repeated": repeated / size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs-root", type=Path, default=ROOT / "runs" / "bench-long-sequence")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--calls", type=int, default=20, help="timed penalty calls per task")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to BENCHMARKS.md")
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    sets = [f"experiment={EXPERIMENT}", "benchmark.minicoin.rounds=2", "methods=[lora,reglora]", *a.sets]
    seconds, work = sefe_run(a.runs_root, sets, env)
    load = load_average()
    print(f"sefe run: {seconds:.0f} s ({work})", flush=True)
    run_dir = a.runs_root / EXPERIMENT

    import torch

    torch.set_num_threads(1)
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())["methods"]
    acc = {m: json.loads((run_dir / m / "report" / "metrics.json").read_text()) for m in ("lora", "reglora")}
    tasks = acc["reglora"]["tasks"]
    diag = {m: [row[j] for j, row in enumerate(r["matrices"]["accuracy"])] for m, r in acc.items()}
    dirs = [run_dir / "reglora" / f"task-{t}" for t in tasks]
    rows = []
    for k, task in enumerate(tasks):
        info = json.loads((dirs[k] / "train.json").read_text())
        step_ms = 1000 * info["seconds"] / max(1, info["steps_run"])
        if k == 0:
            pen = "n/a (no earlier mask)"
            cells = ["–", "–", "–"]
        else:
            f = penalty_figures(dirs[k], dirs[:k], a.calls)
            cells = [f"{1000 * f['seconds']:.2f}", f"{f['bytes'] / 2**20:.2f}", f"{100 * f['repeated']:.1f}"]
            pen = f"{cells[0]} ms"
        rows.append(
            f"| {k + 1} | {task} | {k} | " + " | ".join(cells) + f" | {step_ms:.0f} | "
            f"{100 * diag['reglora'][k]:.0f} | {100 * diag['lora'][k]:.0f} |"
        )
        print(f"task {k + 1} {task}: penalty {pen}, step {step_ms:.0f} ms", flush=True)
    final = {
        m: {x: 100 * metrics[m]["metrics"]["accuracy"][x] for x in ("MFT", "MFN", "BWT")}
        for m in ("lora", "reglora")
    }
    mean_diag = {m: 100 * statistics.mean(diag[m]) for m in diag}
    cmd = "python bench/bench_long_sequence.py" + "".join(f" --set {shlex.quote(s)}" for s in a.sets)
    if a.runs_root != p.get_default("runs_root"):
        cmd += f" --runs-root {shlex.quote(str(a.runs_root))}"
    sizes = (
        " ".join(s for s in a.sets if "n_train" in s or "n_test" in s)
        or f"default sizes ({MiniCoINConfig.n_train} train / {MiniCoINConfig.n_test} test)"
    )
    entry = f"""{utc_heading()}

Command: `{cmd}`: one cold `sefe run --set benchmark.minicoin.rounds=2 --set 'methods=[lora,reglora]'`
({sizes} per task, shipped base), {seconds:.0f} s ({work}); load after it: {load}. Machine:
{machine()}. The penalty is measured afterwards on the stored files: task k's saved LoRA factors
against the saved masks R_1..R_(k-1), forward + backward, median of {a.calls} calls (1 thread);
"repeated" = share of the multiset R_1 ⊎ … ⊎ R_(k-1) (entries counted by multiplicity) at
positions that more than one earlier task masked. Step = RegLoRA's `trainer.train` wall time on
task k over its optimizer steps (train.json; data, forward, backward, penalty, optimizer, with the
run's two workers sharing the cores, so it swings with what runs beside it).
Plasticity = accuracy on task k right after learning it (a[k][k], %).

| k | task | masks | penalty fwd+bwd (ms) | mask memory (MiB) | repeated (%) | RegLoRA step (ms) | plasticity RegLoRA | plasticity LoRA |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Final (16 stages, %): LoRA MFT {final["lora"]["MFT"]:.1f}, MFN {final["lora"]["MFN"]:.1f}, BWT {final["lora"]["BWT"]:.1f};
RegLoRA MFT {final["reglora"]["MFT"]:.1f}, MFN {final["reglora"]["MFN"]:.1f}, BWT {final["reglora"]["BWT"]:.1f}.
Mean plasticity: LoRA {mean_diag["lora"]:.1f}, RegLoRA {mean_diag["reglora"]:.1f}."""
    publish(entry, SECTION, write=not a.no_write)


if __name__ == "__main__":
    main()
