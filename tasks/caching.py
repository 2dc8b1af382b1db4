"""How every pipeline step is cached (docs/design.md §5; the keys themselves: sefe_core/keys.py).

A step's cache key = step name + task index + hash of (the config fields that step reads + the
sha256 of its input artifacts). The flow computes that `key` dict and passes it as a parameter;
the step's other parameters (the full config, paths) do not enter the key, so changing a field a
step does not read never re-runs it. Results persisted by Prefect are small JSON documents
(paths + hashes) under `<run_dir>/.prefect-results/<cache key>`; the artifacts are files.

Every result lists the files it stands for (`files`: path -> sha256, bytes, mtime). A cache hit
whose files are no longer those (damaged, or a changed config re-ran a step that writes the same
path) is stale: `run_step` runs the step again instead of returning it.

Three runners walk the same DAG (flows/pipeline.py): `run_step` (a Prefect task run, inside the
flows), `cached_step` (the stored result or NotCached: a finished run shown without Prefect) and
`local_step` (the stored result, else the step's function in this process: the CLI's commands).
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task, task
from prefect.context import TaskRunContext

from data_contracts import mismatched, sha256_once
from sefe_core import counters
from sefe_core.hashing import config_hash

F = TypeVar("F", bound=Callable[..., Any])
RESULTS_DIR = ".prefect-results"


class NotCached(LookupError):
    """`cached_step` found no usable stored result: the step has to run."""


def cache_key(name: str, k: int, key: dict[str, Any]) -> str:
    return f"{name}-k{int(k):02d}-{config_hash(key, 24)}"


def _prefect_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    return cache_key(ctx.task.name, params["k"], params["key"])


RUN = "{run_dir}"  # how a stored result spells the run directory (run directories are relocatable)


def _portable(value: Any, run_dir: str) -> Any:
    """A step result as it is stored: paths inside the run directory relative to it, so a copied
    or moved run directory finds its own files, not the original's."""
    if isinstance(value, str):
        return RUN + value[len(run_dir) :] if value == run_dir or value.startswith(run_dir + "/") else value
    if isinstance(value, dict):
        return {_portable(k, run_dir): _portable(v, run_dir) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(v, run_dir) for v in value]
    return value


def _local(value: Any, run_dir: str | Path) -> Any:
    """A stored result with its paths in the run directory it is read from."""
    if isinstance(value, str):
        return str(run_dir) + value[len(RUN) :] if value.startswith(RUN) else value
    if isinstance(value, dict):
        return {_local(k, run_dir): _local(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_local(v, run_dir) for v in value]
    return value


def step(
    name: str, *, retries: int = 0, retry_delay_seconds: float = 2.0,
    retry_condition_fn: Callable[..., bool] | None = None,
) -> Callable[[F], Task]:  # fmt: skip
    """A cached pipeline step. Its function takes `run_dir`, `k` (task index, 0 for run-level
    steps) and `key` (what the cache key hashes) before anything else; what it returns is stored
    with run-directory paths made relative (the runners below give them back absolute)."""

    def decorate(fn: F) -> Task:
        @functools.wraps(fn)
        def stored(run_dir: str, k: int, key: dict, *args: Any, **kwargs: Any) -> Any:
            return _portable(fn(run_dir, k, key, *args, **kwargs), str(run_dir))

        return task(
            name=name,
            cache_key_fn=_prefect_cache_key,
            persist_result=True,
            result_serializer="json",
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            retry_condition_fn=retry_condition_fn,
            cache_expiration=None,
        )(stored)

    return decorate


def files(*paths: str | Path) -> dict[str, dict[str, Any]]:
    """The `files` entry of a step result: what it wrote, with its content hash (of the file as
    it is now, never a hash remembered from elsewhere) and stat."""
    out = {}
    for p in paths:
        st = Path(p).stat()
        out[str(p)] = {"sha256": sha256_once(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def sha_of(entry: dict[str, dict[str, Any]], path: str | Path) -> str:
    """The sha256 of `path` in a `files` entry (hash each output once)."""
    return entry[str(path)]["sha256"]


def intact(result: Any) -> bool:
    """Can a stored result stand for its step? Not when it asked for a rerun (`rerun_because`:
    ASD rejects to retry), nor when the files it stands for are not the ones it wrote. By
    content (sha256, hashed once per process per file version: sefe_core never re-reads a
    multi-GB adapter at every step): a file damaged, truncated or swapped for another of the
    same size makes the result stale, and the step that wrote it runs again."""
    if (result or {}).get("rerun_because"):
        return False
    return all(
        mismatched(path, info["sha256"]) is None for path, info in (result or {}).get("files", {}).items()
    )


def run_step(
    t: Task,
    run_dir: str | Path,
    k: int,
    key: dict[str, Any],
    *,
    label: str = "",
    background: bool = False,
    **kwargs: Any,
) -> Any:
    """Call step `t` as a Prefect task, with its results stored under this run directory; a
    stale cache hit is run again. `label` names the task run in the UI (`train lora k3 ...`).
    `background=True` submits it to the flow's thread pool and returns a `Pending` (see
    `resolve`): evaluation of stage k overlaps the training of task k+1 on the second core."""
    storage = Path(run_dir) / RESULTS_DIR
    _borrow(t.name, run_dir, k, key)
    name = " ".join(p for p in (t.name, label, f"k{k}" if k else "") if p)
    call = t.with_options(result_storage=storage, task_run_name=name)
    params = {"run_dir": str(run_dir), "k": k, "key": key, **kwargs}
    if background:
        return Pending(call, params, call.submit(**params))
    return _settle(call, params, call(**params, return_state=True))


def _settle(call: Task, params: dict[str, Any], state: Any) -> Any:
    result = _local(state.result(), params["run_dir"])
    cached = state.name == "Cached"
    if cached and not intact(result):
        result, cached = _local(call.with_options(refresh_cache=True)(**params), params["run_dir"]), False
    outcome = "steps_reused" if cached else "steps_run"
    counters.add(outcome)
    counters.add(f"{outcome}:{call.name}")  # per step, for a sweep's report
    _publish(call.name, params["run_dir"], params["k"], params["key"])
    return result


# --------------------------------------------------------------------------------------------
# Steps shared between run directories (the points of a sweep, sefe_core/sweep.py)
# --------------------------------------------------------------------------------------------
# Inside `shared_index(dir)`, every step a run finishes is listed in `dir` (its cache key -> the
# run directory holding it), and a step another run directory already finished under the same
# key is taken from there: its files are hard-linked into this run directory at the same
# relative paths and its stored result copied, so Prefect finds it as an ordinary cache hit.
# Hard links cost no disk and are safe because every artifact is written by atomic rename,
# never modified in place: a later write in one run directory gives it a new file.
_SHARED: dict[str, Path | None] = {"index": None}
_SHARED_LOCK = threading.Lock()


@contextmanager
def shared_index(index_dir: str | Path) -> Iterator[Path]:
    index = Path(index_dir).absolute()
    index.mkdir(parents=True, exist_ok=True)
    previous, _SHARED["index"] = _SHARED["index"], index
    try:
        yield index
    finally:
        _SHARED["index"] = previous


def _run_paths(value: Any) -> set[str]:
    """The paths a stored (portable) result names inside its run directory, relative to it."""
    if isinstance(value, str):
        return {value[len(RUN) + 1 :]} if value.startswith(RUN + "/") else set()
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return set().union(*(_run_paths(v) | (_run_paths(k) if isinstance(k, str) else set()) for k, v in items))


def _link(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src` (hard link; a copy across file systems), atomically."""
    import shutil

    if dst.exists() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".sefe-link-{os.getpid()}-{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _usable_source(index: Path, ck: str) -> tuple[Path, Any] | None:
    """The run directory the index names for cache key `ck` and its stored (portable) result,
    if that result is still there and its files are still the ones it wrote."""
    from prefect.results import ResultRecord

    if not (index / ck).exists():
        return None
    source = Path(json.loads((index / ck).read_text())["run_dir"])
    record = source / RESULTS_DIR / ck
    if not record.exists():
        return None
    stored = ResultRecord.deserialize(record.read_bytes()).result
    return (source, stored) if intact(_local(stored, source)) else None


def _borrow(name: str, run_dir: str | Path, k: int, key: dict[str, Any]) -> bool:
    """Take this step's result from another run directory of the shared index, if one finished
    it under the same key and its files are still the ones it wrote (else the step runs here)."""
    index = _SHARED["index"]
    ck = cache_key(name, k, key)
    own = Path(run_dir) / RESULTS_DIR / ck
    if index is None or own.exists():
        return False
    with _SHARED_LOCK:
        found = _usable_source(index, ck)
        if found is None or found[0] == Path(run_dir).absolute():
            return False
        source, stored = found
        for rel in sorted(_run_paths(stored)):
            src = source / rel
            if src.is_dir():  # not its hidden parts: caches (datasets' encodings), locks, temp files
                tree = (
                    p for p in src.rglob("*") if not any(c.startswith(".") for c in p.relative_to(src).parts)
                )
                for f in sorted(p for p in tree if p.is_file()):
                    _link(f, Path(run_dir) / f.relative_to(source))
            elif src.is_file():
                _link(src, Path(run_dir) / rel)
        _link(source / RESULTS_DIR / ck, own)
    counters.add("steps_shared")
    counters.add(f"steps_shared:{name}")
    return True


def _publish(name: str, run_dir: str | Path, k: int, key: dict[str, Any]) -> None:
    """List this run directory's finished step in the shared index, unless the index already
    names a usable one (a source since damaged or removed is replaced)."""
    index = _SHARED["index"]
    ck = cache_key(name, k, key)
    if index is None or not (Path(run_dir) / RESULTS_DIR / ck).exists():
        return
    from data_contracts import atomic_path

    with _SHARED_LOCK:
        if _usable_source(index, ck) is not None:
            return
        with atomic_path(index / ck) as tmp:
            tmp.write_text(json.dumps({"run_dir": str(Path(run_dir).absolute())}))


class Pending:
    """A step submitted with `background=True`; `resolve` waits for it."""

    def __init__(self, call: Task, params: dict[str, Any], future: Any):
        self.call, self.params, self.future = call, params, future

    def get(self) -> Any:
        self.future.wait()
        return _settle(self.call, self.params, self.future.state)


def resolve(value: Any) -> Any:
    """The result of a step call, waiting for it if it was submitted in the background."""
    return value.get() if isinstance(value, Pending) else value


def cached_step(
    t: Task,
    run_dir: str | Path,
    k: int,
    key: dict[str, Any],
    *,
    label: str = "",
    background: bool = False,
    **kwargs: Any,
) -> Any:
    """The stored result `run_step` would return as a cache hit, read without Prefect's engine
    (no server, no task run): lets a finished run be shown in seconds. Raises NotCached."""
    path = Path(run_dir) / RESULTS_DIR / cache_key(t.name, k, key)
    if not path.exists():
        raise NotCached(path.name)
    from prefect.results import ResultRecord

    try:
        result = _local(ResultRecord.deserialize(path.read_bytes()).result, run_dir)
    except Exception as e:  # unreadable record: let the real run overwrite it
        raise NotCached(f"{path.name}: {e}") from e
    if not intact(result):
        raise NotCached(f"{path.name}: its files changed since")
    return result


def local_step(
    t: Task,
    run_dir: str | Path,
    k: int,
    key: dict[str, Any],
    *,
    label: str = "",
    background: bool = False,
    **kwargs: Any,
) -> Any:
    """Run a step in this process without Prefect's engine (the CLI's pieces of the DAG): the
    stored result when there is a usable one, else the step's own function, whose result is
    stored as Prefect stores it, so a later flow run finds it as a cache hit and vice versa."""
    try:
        return cached_step(t, run_dir, k, key)
    except NotCached:
        return run_here(t, run_dir, k, key, **kwargs)


def run_here(
    t: Task, run_dir: str | Path, k: int, key: dict[str, Any], *, label: str = "", background: bool = False,
    **kwargs: Any,
) -> Any:  # fmt: skip
    """The step's own function in this process, its result stored as a Prefect task run stores
    it (`local_step` once it found no usable stored result)."""
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer

    from data_contracts import atomic_path

    result = t.fn(run_dir=str(run_dir), k=k, key=key, **kwargs)
    path = Path(run_dir) / RESULTS_DIR / cache_key(t.name, k, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = ResultRecord(
        metadata=ResultRecordMetadata(storage_key=str(path), serializer=JSONSerializer()), result=result
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(record.serialize())
    return _local(result, run_dir)
