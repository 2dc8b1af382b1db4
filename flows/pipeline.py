"""The SEFE DAG as Prefect flows. Reads like the algorithm (DESIGN.md §1):

    prepare benchmark + base model
    ASD once per task (for the methods fed ASD data)
    for each method:  for k = 1..T:  train task k -> extract its mask -> evaluate stage k on tasks 1..k
                      method report
    comparison report

Every step is a cached Prefect task keyed by the task index (tasks/steps.py), so a rerun of a
finished run does no training and no evaluation, and a crashed run resumes at the step that
crashed (inside it, from the Trainer's last checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sefe_core import counters
from sefe_core.config import RunConfig
from sefe_core.reglora import uses_asd
from sefe_core.runlock import run_lock
from tasks import steps
from tasks.caching import run_step


def _prepare(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    run_dir, c = cfg.run_dir, cfg.model_dump(mode="json")
    bench = run_step(steps.prepare_benchmark, run_dir, 0, {"benchmark": c["benchmark"]}, cfg_json=c)
    base = run_step(steps.prepare_base_model, run_dir, 0, {"model": c["model"]}, cfg_json=c)
    return bench, base


@flow(name="sefe-asd", log_prints=True)
def asd_flow(config: RunConfig, bench: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """ASD of every task of the benchmark: `<run_dir>/data/<task>.parquet` (+ rejects)."""
    cfg, c = config, config.model_dump(mode="json")
    if bench is None:
        bench, _ = _prepare(cfg)
    image_root = str(Path(bench["dir"]) / "images")
    out = {}
    for k, task in enumerate(bench["tasks"], start=1):
        key = {
            "asd": c["asd"],
            "benchmark": cfg.benchmark.name,
            "task": task,
            "source": bench["sha256"][task],
        }
        out[task] = run_step(
            steps.asd,
            cfg.run_dir,
            k,
            key,
            cfg_json=c,
            task=task,
            source=str(Path(bench["dir"]) / f"{task}.parquet"),
            image_root=image_root,
        )
    return out


@flow(name="sefe-continual", log_prints=True)
def continual_flow(
    config: RunConfig,
    method: str,
    bench: dict[str, Any],
    base: dict[str, Any],
    data: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One method over the task sequence. `data` (task -> {path, sha256}) overrides the
    benchmark's training files (the ASD output for `asd` and `sefe`)."""
    cfg, c, run_dir = config, config.model_dump(mode="json"), config.run_dir
    image_root = str(Path(bench["dir"]) / "images")
    train_key = cfg.train.key_fields()
    done: list[dict[str, Any]] = []  # per finished task: train + mask results
    evals = []
    for k, task in enumerate(bench["tasks"], start=1):
        src = (data or {}).get(task) or {
            "path": str(Path(bench["dir"]) / f"{task}.parquet"),
            "sha256": bench["sha256"][task],
        }
        priors = [{"adapter": d["train"]["adapter_sha256"], "mask": d["mask"]["sha256"]} for d in done]
        tr = run_step(
            steps.train,
            run_dir,
            k,
            {
                "method": method,
                "train": train_key,
                "data": src["sha256"],
                "base": base["key"],
                "priors": priors,
            },
            cfg_json=c,
            method=method,
            task=task,
            data=src["path"],
            image_root=image_root,
            base_path=base["path"],
            prior_task_dirs=[d["train"]["task_dir"] for d in done],
        )
        mk = run_step(
            steps.mask,
            run_dir,
            k,
            {
                "method": method,
                "mask_percent": cfg.train.mask_percent,
                "seed": cfg.train.seed,
                "adapter": tr["adapter_sha256"],
            },
            cfg_json=c,
            method=method,
            task_dir=tr["task_dir"],
        )
        done.append({"train": tr, "mask": mk})
        ev = run_step(
            steps.evaluate,
            run_dir,
            k,
            {
                "method": method,
                "eval": c["eval"],
                "base": base["key"],
                "adapters": [d["train"]["adapter_sha256"] for d in done],
                "tests": [bench["sha256"][t] for t in bench["tasks"][:k]],
            },
            cfg_json=c,
            method=method,
            base_path=base["path"],
            task_dirs=[d["train"]["task_dir"] for d in done],
            bench_dir=bench["dir"],
        )
        evals.append(ev)
    report = run_step(
        steps.method_report,
        run_dir,
        0,
        {"method": method, "predictions": [e["sha256"] for e in evals]},
        method=method,
        tasks=bench["tasks"],
    )
    return {"method": method, "report": report, "predictions": [e["sha256"] for e in evals]}


@flow(name="sefe-pipeline", log_prints=True)
def sefe_pipeline(config: RunConfig = RunConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form shows the default)
    """ASD once, then every chosen method over the sequence, then the comparison report."""
    cfg = config
    log = get_run_logger()
    before = counters.snapshot()
    with run_lock(cfg.run_dir):
        bench, base = _prepare(cfg)
        data = asd_flow(cfg, bench) if any(uses_asd(m) for m in cfg.methods) else {}
        results = [continual_flow(cfg, m, bench, base, data if uses_asd(m) else None) for m in cfg.methods]
        comparison = run_step(
            steps.comparison_report,
            cfg.run_dir,
            0,
            {"methods": cfg.methods, "reports": [r["predictions"] for r in results]},
            methods=cfg.methods,
            tasks=bench["tasks"],
        )
    _publish(comparison)
    work = {k: counters.get(k) - before.get(k, 0) for k in ("train_steps", "generations")}
    log.info("work done in this run: %s", work)
    return {**comparison, "work": work}


def _publish(comparison: dict[str, Any]) -> None:
    """The methods x metrics table and the report as Prefect artifacts (shown in the UI)."""
    from sefe_core.report import metrics_summary

    summary = metrics_summary(comparison["metrics"])
    rows = []
    for method, m in summary["methods"].items():
        row: dict[str, Any] = {"method": method}
        for matrix, values in m["metrics"].items():
            for name, v in values.items():
                row[f"{matrix}.{name}"] = None if v is None else round(100 * v, 2)
        rows.append(row)
    create_table_artifact(rows, key="sefe-metrics", description="methods x metrics (percent)")
    report = Path(comparison["dir"]) / "report.md"
    create_markdown_artifact(
        report.read_text() + f"\n\nReport files (plots): `{comparison['dir']}`\n",
        key="sefe-report",
        description="SEFE comparison report",
    )
