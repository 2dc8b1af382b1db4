"""The `sefe-sweep` flow: one pipeline run per point of the axes (sefe_core/sweep.py), in turn,
sharing finished steps through one index (tasks/caching.py `shared_index`), then the sweep report.

Each point is the pipeline DAG of flows/pipeline.py on the point's own run directory, under its
own run lock; its steps appear in the UI as in a pipeline run. A rerun of a finished sweep runs
nothing (every point's steps are cache hits) and rewrites the report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import RUNNER, _begin, pipeline_dag
from sefe_core import counters, sweep, workers
from sefe_core.config import RunConfig
from sefe_core.runlock import run_lock
from tasks.caching import shared_index

# The paper's mask-share sweep (Table 5: M = 0.5, 1, 2, 5 %): what the UI form shows.
DEFAULT_AXES: dict[str, list[Any]] = {"train.mask_percent": [0.5, 1.0, 2.0, 5.0]}


def _counts(before: dict[str, int]) -> dict[str, Any]:
    """Steps run, reused from the cache, and (of those) finished by another point, since `before`:
    in total and per step name."""
    now = counters.snapshot()
    delta = {k: v - before.get(k, 0) for k, v in now.items() if k.startswith("steps_")}
    out: dict[str, Any] = {o: delta.get(f"steps_{o}", 0) for o in sweep.OUTCOMES}
    by_step: dict[str, dict[str, int]] = {}
    for k, v in delta.items():
        if ":" in k and v:
            outcome, step = k.removeprefix("steps_").split(":", 1)
            by_step.setdefault(step, dict.fromkeys(sweep.OUTCOMES, 0))[outcome] = v
    return {**out, "by_step": dict(sorted(by_step.items()))}


def sweep_dag(config: RunConfig, axes: dict[str, list[Any]], sweep_dir: Path) -> dict[str, Any]:
    """Every point in turn (their steps share one index), then the report."""
    log = get_run_logger()
    points = sweep.expand(config, axes, sweep_dir)  # every point validated before any runs
    log.info("sweep of %d points under %s: %s", len(points), sweep_dir, ", ".join(p.name for p in points))
    metrics, steps = [], {}
    with shared_index(sweep_dir / sweep.INDEX_DIR):
        for i, p in enumerate(points, start=1):
            log.info("point %d/%d: %s", i, len(points), p.name)
            before, t0 = counters.snapshot(), time.perf_counter()
            with run_lock(p.config.run_dir):
                comparison = pipeline_dag(p.config)
            metrics.append(comparison["metrics"])
            steps[p.name] = {**_counts(before), "seconds": round(time.perf_counter() - t0, 1)}
            log.info("point %s: steps %s", p.name, steps[p.name])
    out = sweep.write_report(sweep_dir, axes, points, metrics, steps)
    return {
        "dir": str(out),
        "report": str(out / "sweep.md"),
        "points": [p.name for p in points],
        "steps": sweep.step_totals(steps),
    }


@flow(name="sefe-sweep", log_prints=True, task_runner=RUNNER)
def sefe_sweep(
    config: RunConfig = RunConfig(),  # noqa: B008 (the UI form shows the default)
    axes: dict[str, list[Any]] = DEFAULT_AXES,  # noqa: B006
    sweep_dir: str | None = None,
) -> dict[str, Any]:
    """The pipeline at every point of `axes` (field -> values; `seed` sets every seed) over the
    base `config`, sharing the steps whose keys agree; the report under `<sweep_dir>/report/`."""
    _begin(config)
    where = Path(sweep_dir).absolute() if sweep_dir else sweep.default_sweep_dir(config)
    workers.start(config.worker_count)
    out = sweep_dag(config, axes, where)
    from sefe_core.report import self_contained_markdown

    create_markdown_artifact(
        self_contained_markdown(out["report"]) + f"\n\nReport directory: `{out['dir']}`\n",
        key="sefe-sweep-report",
        description="SEFE sweep: points x metrics, steps run and reused",
    )
    return out
