"""The SEFE DAG as Prefect flows. Reads like the algorithm (docs/design.md §1):

    prepare benchmark + base model
    ASD once per task (for the methods fed ASD data)
    for k = 1..T:  for each method (side by side, in worker processes):
                       train task k -> what the method saves after it (RegLoRA: the mask)
                       -> evaluate stage k on tasks 1..k
    a report per method, the comparison report

Every step is a cached Prefect task keyed by the task index and `sefe_core.keys`, so a rerun of a
finished run does no training and no evaluation, and a crashed run resumes at the step that
crashed (inside it, from the Trainer's last checkpoint).

The DAG is written once, as plain functions taking a step runner: `run_step` (a Prefect task
run) inside the flows, or `cached_step` (read the stored result, no Prefect engine) for
`finished_pipeline`, which shows a finished run without starting Prefect's server. The pipeline
flow calls the ASD and continual DAGs as functions, not subflows: on a 2-core machine each
subflow run costs ~1.8 s of API round trips; their steps still appear in the UI, named
`<step> <method> <task> k<k>`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from sefe_core import counters, keys, workers
from sefe_core.config import RunConfig
from sefe_core.methods import uses_asd, variant
from sefe_core.runlock import run_lock
from tasks import steps
from tasks.caching import cached_step, resolve, run_step

Runner = Callable[..., Any]  # run_step or cached_step


# --------------------------------------------------------------------------------------------
# The DAG
# --------------------------------------------------------------------------------------------
def prepare_dag(cfg: RunConfig, run: Runner = run_step) -> tuple[dict[str, Any], dict[str, Any]]:
    from sefe_core.prepare import benchmark_inputs

    run_dir, c = cfg.run_dir, cfg.model_dump(mode="json")
    bench = run(
        steps.prepare_benchmark, run_dir, 0, keys.benchmark_key(cfg, benchmark_inputs(cfg)), cfg_json=c
    )
    base = run(steps.prepare_base_model, run_dir, 0, keys.base_key(cfg), cfg_json=c)
    return bench, base


def asd_dag(cfg: RunConfig, bench: dict[str, Any], run: Runner = run_step) -> dict[str, dict[str, Any]]:
    """ASD of every task: task -> {path, sha256, ...} of `<run_dir>/data/<task>.parquet`."""
    from sefe_core.rewriter_server import stop_servers

    c = cfg.model_dump(mode="json")
    out = {}
    try:
        for k, task in enumerate(bench["tasks"], start=1):
            out[task] = run(
                steps.asd,
                cfg.run_dir,
                k,
                keys.asd_key(cfg, task, bench["sha256"][task]),
                label=task,
                cfg_json=c,
                task=task,
                source=str(Path(bench["dir"]) / f"{task}.parquet"),
                image_root=str(Path(bench["dir"]) / "images"),
            )
    finally:  # a rewriter server the ASD steps started (asd.server.launch) is not needed for training
        stop_servers()
    return out


class MethodRun:
    """One method's walk over the task sequence: its finished tasks (train + mask results) and its
    stage evaluations. `continual_dag` moves several of them forward side by side."""

    def __init__(self, cfg: RunConfig, method: str, bench: dict[str, Any], base: dict[str, Any],
                 data: dict[str, dict[str, Any]] | None) -> None:  # fmt: skip
        self.cfg, self.method, self.bench, self.base, self.data = cfg, method, bench, base, data
        self.saves_after_task = variant(method).method.artifact is not None
        self.base_id = keys.base_identity(base["path"])
        self.done: list[dict[str, Any]] = []  # per finished task: train + after-task results
        self.evals: list[Any] = []

    def train(self, k: int, task: str, run: Runner) -> Any:
        """Submit the training of task k (on the stage after tasks < k)."""
        b, run_dir = self.bench, self.cfg.run_dir
        src = (self.data or {}).get(task) or {
            "path": str(Path(b["dir"]) / f"{task}.parquet"),
            "sha256": b["sha256"][task],
        }
        # what training task k reads of tasks < k: their adapters, and what the method saved after them
        priors = [[d["train"]["adapter_sha256"], d["after"]["sha256"]] for d in self.done]
        key = keys.train_key(self.cfg.train, self.method, src["sha256"], self.base_id, priors)
        return run(
            steps.train, run_dir, k, key, label=f"{self.method} {task}", cfg_json=self.cfg.model_dump(mode="json"),
            method=self.method, task=task, data=src["path"], image_root=str(Path(b["dir"]) / "images"),
            base_path=self.base["path"], prior_task_dirs=[d["train"]["task_dir"] for d in self.done],
            background=True,
        )  # fmt: skip

    def finish(self, k: int, task: str, tr: dict[str, Any], run: Runner) -> None:
        """Task k is trained: save what the method keeps after it, evaluate stage k."""
        self.after_task(k, task, tr, run)
        self.evaluate(k, task, run)

    def after_task(self, k: int, task: str, tr: dict[str, Any], run: Runner) -> None:
        """Save what the method keeps after task k for the later ones (RegLoRA: the mask)."""
        c, run_dir = self.cfg.model_dump(mode="json"), self.cfg.run_dir
        after: dict[str, Any] = {"sha256": None}
        if self.saves_after_task:
            after = run(
                steps.after_task, run_dir, k, keys.after_task_key(self.cfg.train, self.method, tr["adapter_sha256"]),
                label=f"{self.method} {task}", cfg_json=c, method=self.method, task_dir=tr["task_dir"],
            )  # fmt: skip
        self.done.append({"train": tr, "after": after})

    def evaluate(self, k: int, task: str, run: Runner) -> None:
        """Submit the evaluation of stage k (tasks 1..k trained) on tasks 1..k."""
        c, run_dir = self.cfg.model_dump(mode="json"), self.cfg.run_dir
        if self.evals:  # at most one evaluation in flight per method: a failure surfaces within one task
            self.evals[-1] = resolve(self.evals[-1])
        key = keys.eval_key(
            self.cfg, self.method, self.base_id,
            [d["train"]["adapter_sha256"] for d in self.done],
            [self.bench["sha256"][t] for t in self.bench["tasks"][:k]],
        )  # fmt: skip
        self.evals.append(
            run(
                steps.evaluate,
                run_dir,
                k,
                key,
                label=f"{self.method} {task}",
                cfg_json=c,
                method=self.method,
                base_path=self.base["path"],
                task_dirs=[d["train"]["task_dir"] for d in self.done],
                bench_dir=self.bench["dir"],
                background=True,  # runs while task k+1 trains
            )  # fmt: skip
        )

    def report(self, run: Runner) -> dict[str, Any]:
        predictions = [resolve(e)["sha256"] for e in self.evals]
        report = run(
            steps.method_report, self.cfg.run_dir, 0, keys.method_report_key(self.method, predictions),
            label=self.method, method=self.method, tasks=self.bench["tasks"], background=True,
        )  # fmt: skip
        return {"method": self.method, "report": report, "predictions": predictions}


def continual_dag(
    cfg: RunConfig,
    methods: list[str],
    bench: dict[str, Any],
    base: dict[str, Any],
    data: dict[str, dict[str, Any]] | None = None,
    run: Runner = run_step,
) -> list[dict[str, Any]]:
    """The methods over the task sequence, side by side: at each task k every method's training
    of task k is submitted at once (the worker pool runs as many as it has workers), then each
    method extracts its mask and submits the evaluation of its stage k. `data` (task -> {path,
    sha256}: the ASD output) feeds the methods that train on ASD data."""
    if cfg.eval.backend == "vllm":  # before any training: a missing vLLM is found now, not after task 1
        from sefe_core.vllm_backend import vllm_python

        vllm_python(cfg.eval.vllm_python)
    runs = [MethodRun(cfg, m, bench, base, data if uses_asd(m) else None) for m in methods]
    for k, task in enumerate(bench["tasks"], start=1):
        trained = [r.train(k, task, run) for r in runs]
        for r, tr in zip(runs, trained, strict=True):
            r.finish(k, task, resolve(tr), run)
    return [r.report(run) for r in runs]


def pipeline_dag(cfg: RunConfig, run: Runner = run_step) -> dict[str, Any]:
    """ASD once, every chosen method over the sequence, the comparison report."""
    bench, base = prepare_dag(cfg, run)
    data = asd_dag(cfg, bench, run) if any(uses_asd(m) for m in cfg.methods) else {}
    results = continual_dag(cfg, cfg.methods, bench, base, data, run)
    for r in results:
        r["report"] = resolve(r["report"])
    return run(
        steps.comparison_report,
        cfg.run_dir,
        0,
        keys.comparison_key(cfg.methods, [r["predictions"] for r in results]),
        methods=cfg.methods,
        tasks=bench["tasks"],
    )


def finished_pipeline(cfg: RunConfig) -> dict[str, Any] | None:
    """The comparison result of a run that is already complete for this config, read from the
    stored step results without Prefect's engine; None when any step still has to run."""
    from tasks.caching import NotCached

    try:
        return pipeline_dag(cfg, cached_step)
    except NotCached:
        return None


# --------------------------------------------------------------------------------------------
# The flows (deployable entry points; each takes the run lock of its run directory)
# --------------------------------------------------------------------------------------------
# Steps wait in threads on the worker pool (sefe_core.workers): room for every method's training
# plus its evaluation at once.
RUNNER = ThreadPoolTaskRunner(max_workers=32)


def _differences(value: Any, default: Any) -> Any:
    """The parts of a config dump that differ from the default's (nested sections kept nested)."""
    if isinstance(value, dict) and isinstance(default, dict):
        out = {k: _differences(v, default.get(k)) for k, v in value.items() if v != default.get(k)}
        return {k: v for k, v in out.items() if v != {}}
    return value


def _begin(config: RunConfig) -> None:
    """What every flow run says first: where its files go (absolute: a deployment runs in the
    directory `prefect deploy` ran in) and what differs from the embedded default (the UI's
    Parameters tab shows `{}` for a default run); and the libraries' per-load noise off."""
    import json

    from sefe_core.progress import quiet_libraries

    quiet_libraries()
    changed = _differences(config.model_dump(mode="json"), RunConfig().model_dump(mode="json"))
    get_run_logger().info(
        "run directory: %s; config fields that differ from the default: %s",
        config.run_dir.absolute(), json.dumps(changed) if changed else "none",
    )  # fmt: skip


@flow(name="sefe-pipeline", log_prints=True, task_runner=RUNNER)
def sefe_pipeline(config: RunConfig = RunConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form shows the default)
    """ASD once, then every chosen method over the sequence, then the comparison report."""
    _begin(config)
    before = counters.snapshot()
    workers.start(config.worker_count)  # their imports overlap preparing and ASD
    with run_lock(config.run_dir):
        comparison = pipeline_dag(config)
    _publish(comparison)
    work = {k: counters.get(k) - before.get(k, 0) for k in ("train_steps", "generations")}
    get_run_logger().info("work done in this run: %s", work)
    return {**comparison, "work": work}


@flow(name="sefe-asd", log_prints=True)
def asd_flow(config: RunConfig = RunConfig()) -> dict[str, dict[str, Any]]:  # noqa: B008
    """ASD of every task of the benchmark: `<run_dir>/data/<task>.parquet` (+ rejects)."""
    _begin(config)
    with run_lock(config.run_dir):
        bench, _ = prepare_dag(config)
        return asd_dag(config, bench)


@flow(name="sefe-continual", log_prints=True, task_runner=RUNNER)
def continual_flow(config: RunConfig = RunConfig(), method: str = "sefe") -> dict[str, Any]:  # noqa: B008
    """One method over the task sequence (ASD first if the method trains on ASD data)."""
    variant(method)  # an unknown name fails before anything runs
    _begin(config)
    workers.start(config.worker_count)
    with run_lock(config.run_dir):
        bench, base = prepare_dag(config)
        data = asd_dag(config, bench) if uses_asd(method) else None
        out = continual_dag(config, [method], bench, base, data)[0]
        return {**out, "report": resolve(out["report"])}


@flow(name="sefe-report", log_prints=True)
def report_flow(config: RunConfig = RunConfig()) -> dict[str, Any]:  # noqa: B008
    """Rebuild the comparison report from the predictions already on disk (the nightly refresh
    of a long run: methods still training are left out; nothing is trained or evaluated)."""
    from sefe_core.evaluate import run_methods
    from sefe_core.report import build_report

    _begin(config)
    run_dir = config.run_dir.absolute()
    methods = [m for m in config.methods if m in run_methods(run_dir)]
    if not methods:  # not a failure: the night before the first stage is evaluated
        get_run_logger().warning(
            "nothing to report yet: no predictions under %s for %s. They come from the runs that "
            "train and evaluate (deployments coin-sefe, minicoin-demo, or `sefe run`) on this run "
            "directory.", run_dir, ", ".join(config.methods),
        )  # fmt: skip
        return {"dir": None, "metrics": None, "methods": []}
    out = build_report(run_dir, methods=methods)
    comparison = {"dir": str(out), "metrics": str(out / "metrics.json"), "methods": methods}
    _publish(comparison)
    return comparison


def _publish(comparison: dict[str, Any]) -> None:
    """The comparison as Prefect artifacts (the UI's Artifacts tab): the headline table in run
    order, every metric in a second table, and the report with its plots inlined."""
    from sefe_core.analysis import full_rows, headline_rows, metrics_summary
    from sefe_core.report import self_contained_markdown

    summary = metrics_summary(comparison["metrics"])
    report_dir = Path(comparison["dir"]).resolve()
    create_table_artifact(
        headline_rows(summary),
        key="sefe-metrics",
        description="Methods in run order: accuracy metrics and the mean forgetting split (percent)",
    )
    create_table_artifact(
        full_rows(summary),
        key="sefe-metrics-full",
        description="Every metric of the accuracy, format and content matrices (percent)",
    )
    create_markdown_artifact(
        self_contained_markdown(report_dir / "report.md") + f"\n\nReport directory: `{report_dir}`\n",
        key="sefe-report",
        description="SEFE comparison report",
    )
