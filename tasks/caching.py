"""How every pipeline step is cached (DESIGN.md §4).

A step's cache key = step name + task index + hash of (the config fields that step reads + the
sha256 of its input artifacts). The flow computes that `key` dict and passes it as a parameter;
the step's other parameters (the full config, paths) do not enter the key, so changing a field a
step does not read never re-runs it. Results persisted by Prefect are small JSON documents
(paths + hashes) under `<run_dir>/.prefect-results/`; the artifacts themselves are files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task, task
from prefect.context import TaskRunContext

from sefe_core.hashing import config_hash

F = TypeVar("F", bound=Callable[..., Any])
RESULTS_DIR = ".prefect-results"


def step_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    return f"{ctx.task.name}-k{int(params['k']):02d}-{config_hash(params['key'], 24)}"


def step(name: str, *, retries: int = 0, retry_delay_seconds: float = 2.0) -> Callable[[F], Task]:
    """A cached pipeline step. Its function takes `run_dir`, `k` (task index, 0 for run-level
    steps) and `key` (what the cache key hashes) before anything else."""
    return task(
        name=name,
        cache_key_fn=step_cache_key,
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        cache_expiration=None,
    )


def run_step(t: Task, run_dir: str | Path, k: int, key: dict[str, Any], **kwargs: Any) -> Any:
    """Call step `t` with its results stored under this run directory."""
    storage = Path(run_dir) / RESULTS_DIR
    return t.with_options(result_storage=storage)(run_dir=str(run_dir), k=k, key=key, **kwargs)
