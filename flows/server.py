"""The Prefect API server a local `sefe run` reports to, when no PREFECT_API_URL is set.

Prefect's own temporary server is a plain child in the run's process group: a Ctrl-C meant for
the run kills it first, and the flow then hangs retrying a dead API; a `kill -9` of the run
leaves it behind. This one is the same server (Prefect's app under uvicorn, with its UI while the
run lasts: the "View at" link of the run's first log line works), started in
its own session so that signals to the run's group do not reach it, stopped by the run when it
ends for any reason, and watching its parent: when the run is gone (even by `kill -9`), it exits.

    with local_server():      # sets PREFECT_API_URL for this process while the run lasts
        sefe_pipeline(cfg)

`python -m flows.server PARENT_PID PORT` is the server process itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

_current: subprocess.Popen | None = None
WATCH_EVERY_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop() -> None:
    """Stop the server this process started (if any): SIGTERM, then SIGKILL after 5 s."""
    global _current
    proc, _current = _current, None
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def local_server() -> Iterator[str | None]:
    """A temporary server for this run (its API URL), or None when the user has one configured."""
    import httpx
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield None
        return
    global _current
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        # what Prefect's own temporary server runs with
        "PREFECT_UI_ENABLED": os.environ.get(
            "PREFECT_UI_ENABLED", "1"
        ),  # the "View at" link works during the run
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    _current = proc = subprocess.Popen(
        [sys.executable, "-m", "flows.server", str(os.getpid()), str(port)], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the temporary Prefect server exited with code {proc.returncode} at start"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not answer {url}/health in time")
            time.sleep(0.2)
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                flush_logs()
    finally:
        stop()


def flush_logs() -> None:
    """Send the run's last log lines and events before the server goes (else: "Error logging to
    API" at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=5)


def _watch_parent(parent: int) -> None:
    """Exit when the run that started this server is gone (reparented: its pid is no longer ours)."""
    while os.getppid() == parent:
        time.sleep(WATCH_EVERY_S)
    os._exit(0)


def _serve(parent: int, port: int) -> None:
    import prefect
    import uvicorn

    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()
    sys.path.insert(0, str(prefect.__module_path__.parent))
    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
