"""The pipeline steps as cached Prefect tasks: thin wrappers over sefe_core.

Each step takes `run_dir`, `k` (task index; 0 for run-level steps), `key` (the config fields it
reads + its inputs' hashes, from sefe_core/keys.py: the cache key), then the full run config as
JSON. It returns paths + sha256 of what it wrote, which become the `key` inputs of its dependants.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext

from sefe_core import counters, keys
from sefe_core.config import RunConfig
from sefe_core.workers import run_job
from tasks.caching import files, sha_of, step


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger in a flow; outside one (tasks.caching.local_step) the CLI's."""
    return get_run_logger() if TaskRunContext.get() is not None else logging.getLogger("sefe")


_PHASES: dict[tuple[str, str], Any] = {}  # (flow run, phase) -> its progress artifact's id
_PHASES_LOCK = threading.Lock()
LOG_EVERY_S = 30.0  # a long step says where it is this often (a 12 s MiniCoIN task: not at all)


def _progress(phase: str, what: str, k: int = 1, of: int = 1) -> Callable[[int, int], None]:
    """Progress of one part (`k` of `of`) of a phase of the run: `train-lora` over all its tasks,
    `asd`, `base-model`. In a flow: one progress artifact per phase and flow run, updated in
    place (a UI card per phase, not per step) with a description that says where it is. In or
    outside a flow: a log line every LOG_EVERY_S seconds while a step runs."""
    logger = _log()
    in_flow = TaskRunContext.get() is not None
    flow_run = FlowRunContext.get()
    run_key = (str(flow_run.flow_run.id) if flow_run else "", phase)
    last = [time.monotonic()]
    shown = [-1]  # the whole percent the artifact shows (an update is an API call)

    def report(done: int, total: int) -> None:
        within = done / max(total, 1)
        pct = 100.0 * (k - 1 + within) / of
        # the phase's percent first: a UI card shows only the description's start
        where = f"{pct:.0f}% - {what}" + (f", this part {100 * within:.0f}%" if of > 1 else "")
        now = time.monotonic()
        if now - last[0] >= LOG_EVERY_S:
            last[0] = now
            logger.info("%s", where)
        if in_flow and int(pct) != shown[0]:
            shown[0] = int(pct)
            with _PHASES_LOCK:
                artifact = _PHASES.get(run_key)
                if artifact is None:
                    _PHASES[run_key] = create_progress_artifact(pct, key=_slug(phase), description=where)
                    return
            update_progress_artifact(artifact, pct, description=where)

    return report


def _cfg(cfg_json: dict[str, Any]) -> RunConfig:
    return RunConfig.model_validate(cfg_json)


@step("prepare-benchmark")
def prepare_benchmark(run_dir: str, k: int, key: dict, cfg_json: dict) -> dict[str, Any]:
    from sefe_core.prepare import ensure_benchmark

    bench = ensure_benchmark(_cfg(cfg_json))
    _log().info("benchmark %s: %d tasks at %s", bench.name, len(bench.tasks), bench.dir)
    return {
        "dir": str(bench.dir),
        "tasks": list(bench.tasks),
        "sha256": bench.sha256,
        "files": files(*(bench.task_file(t) for t in bench.tasks)),
    }


@step("prepare-base-model")
def prepare_base_model(run_dir: str, k: int, key: dict, cfg_json: dict) -> dict[str, Any]:
    from sefe_core.prepare import ensure_base_model

    phases = {"vision": _progress("base-model", "base model: vision pre-training (stage 1/2)", 1, 2),
              "instructions": _progress("base-model", "base model: instruction pre-training (stage 2/2)", 2, 2)}  # fmt: skip
    base = ensure_base_model(_cfg(cfg_json), progress=lambda phase, done, total: phases[phase](done, total))
    _log().info("base model at %s (held-out loss %.3f)", base.path, base.heldout_loss_after)
    return {"path": str(base.path), "key": base.key, "files": files(Path(base.path) / "config.json")}


def _rewriter_may_recover(task: object, task_run: object, state: Any) -> bool:
    """Retry ASD when a served rewriter was down or gave unusable replies, not when the rules
    (or a well-formed but wrong model) would reject the same rows again."""
    from sefe_core.asd import TooManyRejects
    from sefe_core.rewriter import RewriterUnavailable

    try:
        state.result()
    except RewriterUnavailable:
        return True
    except TooManyRejects as e:
        return e.retryable > 0
    except Exception:
        return False
    return False


# a served rewriter can be briefly down
@step("asd", retries=2, retry_delay_seconds=10, retry_condition_fn=_rewriter_may_recover)
def asd(
    run_dir: str, k: int, key: dict, cfg_json: dict, task: str, source: str, image_root: str
) -> dict[str, Any]:
    from sefe_core.asd import run_asd

    cfg = _cfg(cfg_json)
    tasks = cfg.benchmark.task_names
    progress = _progress("asd", f"ASD of task {k}/{len(tasks)} ({task})", k, len(tasks))
    res = run_asd(
        source,
        image_root,
        Path(run_dir) / "data",
        cfg.asd,
        benchmark=cfg.benchmark.name,
        progress=progress,
        say=_log().info,  # a launched rewriter server's start-up, in the run log
    )
    _log().info(
        "ASD %s: selected %d = converted %d + rejected %d", task, res.selected, res.converted, res.rejected
    )
    written = files(res.data_path, res.rejects_path)
    return {
        "path": str(res.data_path),
        "sha256": sha_of(written, res.data_path),
        "rejects": str(res.rejects_path),
        "selected": res.selected,
        "converted": res.converted,
        "rejected": res.rejected,
        "files": written,
        # the next run does this step again, sending these rejects to the rewriter once more
        "rerun_because": f"{res.retryable} ASD rejects to retry" if res.retryable else None,
    }


@step("train")
def train(
    run_dir: str,
    k: int,
    key: dict,
    cfg_json: dict,
    method: str,
    task: str,
    data: str,
    image_root: str,
    base_path: str,
    prior_task_dirs: list[str],
) -> dict[str, Any]:
    from sefe_core.train import train_task

    cfg = _cfg(cfg_json)
    task_dir = Path(run_dir) / method / f"task-{task}"
    args = (base_path, prior_task_dirs, data, image_root, task_dir, cfg.train, method)
    if cfg.train.num_processes > 1:  # several GPUs: accelerate launch, output to the run log
        from sefe_core.launch import train_task_launched

        res = train_task_launched(*args, trust_remote_code=cfg.model.trust_remote_code, on_line=_log().info)
        counters.add("train_steps", res.steps_run)
    else:  # in a worker process when the run has workers (two methods train at once on 2 cores)
        n = len(cfg.benchmark.task_names)
        progress = _progress(f"train-{method}", f"{method}: training task {k}/{n} ({task})", k, n)
        res = run_job(
            train_task, *args, workers=cfg.worker_count, trust_remote_code=cfg.model.trust_remote_code,
            progress=progress,
        )  # fmt: skip
    _log().info(
        "%s task %d (%s): %d steps run, final loss %.4f", method, k, task, res.steps_run, res.final_loss
    )
    if res.config_hash != keys.digest(key):  # the library keyed the task on other inputs than the flow
        raise RuntimeError(
            f"{task_dir}: recorded under key {res.config_hash}, the flow's is {keys.digest(key)}"
        )
    adapter = res.adapter_dir / "adapter_model.safetensors"
    written = files(adapter, *([res.projector_path] if res.projector_path is not None else []))
    return {
        "task_dir": str(task_dir),
        "key": res.config_hash,
        "adapter_sha256": sha_of(written, adapter),
        "global_step": res.global_step,
        "files": written,
    }


@step("after-task")
def after_task(run_dir: str, k: int, key: dict, cfg_json: dict, method: str, task_dir: str) -> dict[str, Any]:
    """What the method saves after a task for the later ones (RegLoRA: the mask)."""
    from sefe_core.methods import method_of

    # train_task saved it at the settings it ran with, and after_task keeps a file whose settings
    # still match (a miss here after a train hit: e.g. mask_percent changed)
    path = method_of(method).after_task(Path(task_dir), _cfg(cfg_json).train)
    if path is None:
        return {"path": None, "sha256": None, "files": {}}
    written = files(path)
    return {"path": str(path), "sha256": sha_of(written, path), "files": written}


@step("evaluate")
def evaluate(
    run_dir: str,
    k: int,
    key: dict,
    cfg_json: dict,
    method: str,
    base_path: str,
    task_dirs: list[str],
    bench_dir: str,
) -> dict[str, Any]:
    from sefe_core.evaluate import evaluate_stage_dir, predictions_path
    from sefe_core.prepare import load_benchmark

    cfg = _cfg(cfg_json)
    out = predictions_path(run_dir, method, load_benchmark(bench_dir).tasks[k - 1])
    before = counters.get("generations")
    n = len(cfg.benchmark.task_names)
    progress = _progress(f"evaluate-{method}", f"{method}: evaluating stage {k}/{n} on tasks 1..{k}", k, n)
    res = run_job(
        evaluate_stage_dir, base_path, task_dirs, bench_dir, method, out, workers=cfg.worker_count,
        batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.budgets(cfg.benchmark.name, cfg.benchmark.task_names),
        dtype=cfg.eval.torch_dtype(cfg.train.bf16), trust_remote_code=cfg.model.trust_remote_code, progress=progress,
        backend=cfg.eval.backend, vllm_python=cfg.eval.vllm_python, vllm_engine_args=cfg.eval.vllm_engine_args,
    )  # fmt: skip
    _log().info(
        "%s stage %d: %d predictions on tasks 1..%d, mean score %.3f",
        method, k, res["predictions"], k, res["mean_score"],
    )  # fmt: skip
    written = files(out)
    return {
        "path": str(out),
        "sha256": sha_of(written, out),
        "generations": counters.get("generations") - before,
        "files": written,
    }


@step("method-report")
def method_report(run_dir: str, k: int, key: dict, method: str, tasks: list[str]) -> dict[str, Any]:
    from sefe_core.analysis import analyse_method
    from sefe_core.report import write_method_report

    out = write_method_report(analyse_method(run_dir, method, tasks))
    written = files(out / "metrics.json")
    return {"dir": str(out), "sha256": sha_of(written, out / "metrics.json"), "files": written}


@step("comparison-report")
def comparison_report(
    run_dir: str, k: int, key: dict, methods: list[str], tasks: list[str]
) -> dict[str, Any]:
    from sefe_core.report import build_report

    out = build_report(run_dir, methods, tasks, method_reports=False)
    written = files(out / "metrics.json", out / "report.md")
    return {
        "dir": str(out),
        "metrics": str(out / "metrics.json"),
        "sha256": sha_of(written, out / "metrics.json"),
        "files": written,
    }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())
