"""The heavy steps (training one task, evaluating one stage) in a pool of worker processes.

Why processes: the tiny model's matrices are too small to split one step across cores (and two
trainings in threads of one process share one global RNG, one thread setting and the GIL), so on
a 2-core machine the way to use both cores is two methods training at the same time in two
processes. Each job seeds itself (`train_task` calls `set_seed` first) and runs on one thread, so
its result does not depend on which worker ran it, or on what ran beside it.

`run_job(fn, *args, workers=N, progress=..., **kw)` calls `fn(*args, progress=<callable>, **kw)`:
in this process when N == 0, else in a persistent pool of N spawned workers (started once per
process, reused by later runs). Progress reported in the worker reaches the caller's `progress`
on the calling thread; the work counters (`sefe_core.counters`) a job adds in the worker are added
here when it returns, so "a rerun did no work" is provable either way.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any

from sefe_core import counters

Progress = Callable[[int, int], None]

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_queue: Any = None
_listener: threading.Thread | None = None  # relays the workers' progress from _queue
_latest: dict[str, tuple[int, int]] = {}
_worker_queue: Any = None  # in a worker: where progress goes
_stopping = threading.Event()  # set by kill(): no pool starts again in this process


class WorkerDied(RuntimeError):
    """A worker process ended without returning (killed, out of memory)."""


# ---- in the worker ------------------------------------------------------------------------
def _init_worker(q: Any, env: dict[str, str]) -> None:
    global _worker_queue
    os.environ.update(env)
    _worker_queue = q
    # the run decides when to stop: a Ctrl-C to the terminal's process group reaches the workers
    # too, and the run (flows/cli.py) kills them itself; when the run is gone (kill -9), exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True, name="sefe-parent-watch").start()
    import torch

    torch.set_num_threads(1)  # one core per worker: N workers use N cores
    from sefe_core.progress import quiet_libraries

    quiet_libraries()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _report(job: str, done: int, total: int) -> None:
    if _worker_queue is not None:
        _worker_queue.put((job, done, total))


def _run(job: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, dict[str, int]]:
    before = counters.snapshot()
    result = fn(*args, progress=partial(_report, job), **kwargs)
    after = counters.snapshot()
    return result, {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _warm() -> None:
    """Import what the jobs need while the pipeline prepares (spawned workers start bare)."""
    import sefe_core.evaluate  # noqa: F401
    import sefe_core.train  # noqa: F401


# ---- in the caller ------------------------------------------------------------------------
def _listen(q: Any) -> None:
    while True:
        try:
            item = q.get()
        # the queue closed under it at interpreter exit (a closed connection's handle is None:
        # TypeError from os.read); shutdown() joins this thread so that it does not come to that
        except (EOFError, OSError, ValueError, TypeError):
            return
        if item is None:
            return
        job, done, total = item
        with _lock:
            _latest[job] = (done, total)


def start(workers: int) -> None:
    """Start (or resize) the pool now, so its workers' imports overlap other work."""
    global _pool, _pool_size, _queue, _listener
    if workers <= 0:
        return
    if _stopping.is_set():
        raise WorkerDied("the run is stopping: no new workers")
    with _lock:
        if _pool is not None and _pool_size == workers:
            return
    shutdown()
    ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
    q = ctx.Queue()
    env = {"SEFE_MAIN_PID": str(os.getpid())}  # failpoints kill the whole run, as kill -9 would
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q, env))
    listener = threading.Thread(target=_listen, args=(q,), daemon=True, name="sefe-worker-progress")
    listener.start()
    for _ in range(workers):
        pool.submit(_warm)
    with _lock:
        _pool, _pool_size, _queue, _listener = pool, workers, q, listener
    if _stopping.is_set():  # kill() ran while these were spawning
        kill()
        raise WorkerDied("the run is stopping: no new workers")


def shutdown() -> None:
    global _pool, _pool_size, _queue, _listener
    with _lock:
        pool, q, listener = _pool, _queue, _listener
        _pool, _pool_size, _queue, _listener = None, 0, None, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    if q is not None:
        q.put(None)
    # Wait for the listener to take the None and return. Left reading at interpreter exit (this
    # runs from atexit), multiprocessing's own exit finalizers closed the queue under it, and a
    # finished `sefe run` printed a traceback from this thread (CI's main job; 2 of 5 small runs).
    if listener is not None and listener is not threading.current_thread():
        listener.join(timeout=5.0)


def kill() -> None:
    """Stop every worker now, mid-job (the run is being interrupted: what a job had not saved is
    redone by the rerun, as after kill -9).

    Why the flag and every child, not only the pool's processes: a killed pool fails its jobs, and
    another step's thread would otherwise start a fresh pool in the moments before the process
    exits; those new workers would outlive the run until their parent watch noticed."""
    _stopping.set()
    with _lock:
        pool = _pool
    procs = list(getattr(pool, "_processes", {}).values()) if pool is not None else []
    for proc in procs + mp.active_children():
        with contextlib.suppress(OSError, ValueError):
            proc.kill()


atexit.register(shutdown)


_in_process = threading.Lock()


def run_job(
    fn: Callable[..., Any], /, *args: Any, workers: int, progress: Progress | None = None, **kwargs: Any
) -> Any:
    """`fn(*args, progress=..., **kwargs)` here (workers == 0) or in the pool (blocks until done).

    In this process, one job at a time, whatever its kind: jobs change process-wide state (the
    global RNG, accelerate's state, torch's thread count, which `train_task` sets), and an
    evaluation generating in one thread while a training thread called `torch.set_num_threads`
    is the likeliest cause of a segfault seen once in CI (the suite runs with workers=0)."""
    if workers <= 0:
        with _in_process:
            return fn(*args, progress=progress, **kwargs)
    start(workers)
    assert _pool is not None
    job = uuid.uuid4().hex
    future = _pool.submit(_run, job, fn, args, kwargs)
    shown: tuple[int, int] | None = None
    try:
        while True:
            try:
                result, counted = future.result(timeout=1.0)
                break
            except FutureTimeout:
                with _lock:
                    latest = _latest.get(job)
                if progress is not None and latest is not None and latest != shown:
                    progress(*latest)
                    shown = latest
    except BrokenProcessPool as e:
        shutdown()
        raise WorkerDied(f"a worker process died while running {getattr(fn, '__name__', fn)}") from e
    finally:
        with _lock:
            latest = _latest.pop(job, None)
    if progress is not None and latest is not None and latest != shown:
        progress(*latest)
    for name, n in counted.items():
        counters.add(name, n)
    return result


def default_workers() -> int:
    """Two workers where there are two cores and no GPU (the embedded default's case); on a GPU
    host training runs in-process (one model per GPU, and `accelerate launch` for several)."""
    try:
        import torch

        if torch.cuda.is_available():
            return 0
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 2 if (os.cpu_count() or 1) >= 2 else 0
