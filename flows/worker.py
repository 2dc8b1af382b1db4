"""`sefe worker`: Prefect's process worker for the deployments, with a Ctrl-C that stops it.

Prefect 3.8's `prefect worker start` ignores its first Ctrl-C (measured: a worker with no run
at all, alive 60 s after SIGINT; Prefect's server has the same trouble once a websocket
connected, PrefectHQ/prefect#13868); its second one SIGKILLs the worker and leaves the flow run
it was running alive in its own process group, training on. Here the worker runs as a child,
and a Ctrl-C or SIGTERM:

1. cancels, through the API, every flow run the worker is running: Prefect's worker then
   stops its process group (the run, its worker processes) and the UI shows it Cancelled;
   finished steps are kept and the next run resumes;
2. once they are gone (SIGKILL to a run's group that outlives `RUN_GRACE_S`), stops the worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

RUN_GRACE_S = 30.0  # Prefect's own cancellation: SIGTERM to the run's group, SIGKILL after 30 s
WORKER_GRACE_S = 3.0  # the worker, idle by then: SIGINT, then SIGKILL (it ignores SIGINT)


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgid) of every process, from /proc/<pid>/stat."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, ppid, pgid = stat.read_text().rsplit(")", 1)[1].split()[:3]
            out.append((int(stat.parent.name), state, int(ppid), int(pgid)))
    return out


def flow_runs_under(pid: int) -> dict[str, int]:
    """The flow runs a worker is running: flow run id -> the process group of its process."""
    tree: dict[int, list[int]] = {}
    for child, _, parent, _ in _processes():
        tree.setdefault(parent, []).append(child)
    runs, todo = {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                key = b"PREFECT__FLOW_RUN_ID="
                run = next((e[len(key) :].decode() for e in env if e.startswith(key)), None)
                if run and run not in runs:
                    runs[run] = os.getpgid(child)
    return runs


def _cancel(run_ids: list[str], stopped: Callable[[], None]) -> None:
    """Ask for the runs' cancellation (the worker stops their process groups); once `stopped()`
    says they are gone, wait briefly for the worker to record them Cancelled, else record it."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    with get_client(sync_client=True) as client:
        for run in run_ids:
            with contextlib.suppress(Exception):  # finished meanwhile: nothing to cancel
                client.set_flow_run_state(run, Cancelling(message="sefe worker stopped (Ctrl-C)"), force=True)
        stopped()
        deadline = time.monotonic() + WORKER_GRACE_S
        pending = list(run_ids)
        while pending and time.monotonic() < deadline:
            time.sleep(0.2)
            pending = [r for r in pending if client.read_flow_run(r).state_name == "Cancelling"]
        for run in pending:  # the worker had no time to say so
            with contextlib.suppress(Exception):
                client.set_flow_run_state(run, Cancelled(message="sefe worker stopped (Ctrl-C)"), force=True)


def _group_alive(pgid: int) -> bool:
    """Is a live (not zombie) process left in the group?"""
    return any(group == pgid and state != "Z" for _, state, _, group in _processes())


def stop(worker: subprocess.Popen, say=print) -> None:  # noqa: ANN001 (a print-like callable)
    """Cancel the worker's flow runs, wait for them to go, then stop the worker."""
    runs = flow_runs_under(worker.pid)
    if runs:
        say(f"Cancelling {len(runs)} flow run(s) in flight: {', '.join(runs)} (rerun to resume)")

        def stopped() -> None:
            deadline = time.monotonic() + RUN_GRACE_S
            while any(_group_alive(g) for g in runs.values()) and time.monotonic() < deadline:
                time.sleep(0.2)
            for pgid in runs.values():
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)

        _cancel(list(runs), stopped)
    if worker.poll() is None:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(WORKER_GRACE_S)
        except subprocess.TimeoutExpired:
            worker.kill()  # what Prefect's own second Ctrl-C does
            worker.wait()


def run_worker(pool: str, extra: list[str], say=print) -> int:  # noqa: ANN001
    """`prefect worker start --pool POOL EXTRA...` until it exits or this process is told to stop."""
    exe = str(Path(sys.executable).with_name("prefect"))
    worker = subprocess.Popen([exe, "worker", "start", "--pool", pool, *extra], start_new_session=True)
    told: list[int] = []
    wake = threading.Event()

    def handler(signum: int, frame: object) -> None:
        told.append(signum)
        wake.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while worker.poll() is None and not wake.wait(0.5):
            pass
        if told:
            say(f"{signal.Signals(told[0]).name}: stopping the worker")
            stop(worker, say)
            return 128 + told[0]
        return worker.returncode
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        if worker.poll() is None:
            worker.kill()
