"""The worker pool as an interrupted run uses it: once killed, it stays down."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sleep(seconds: float, progress: object = None) -> float:
    """A job for the pool (importable by a spawned worker)."""
    time.sleep(seconds)
    return seconds


SCRIPT = """
import multiprocessing as mp, threading, time
from sefe_core import workers
from tests.test_workers import _sleep

assert workers.run_job(_sleep, 0, workers=2) == 0
outcome = []
def job():
    try:
        workers.run_job(_sleep, 60, workers=2)
        outcome.append("finished")
    except workers.WorkerDied:
        outcome.append("died")
thread = threading.Thread(target=job)
thread.start()
time.sleep(1)
workers.kill()
thread.join(30)
try:  # another step's thread, after the kill: no fresh pool
    workers.run_job(_sleep, 0, workers=2)
    outcome.append("new pool")
except workers.WorkerDied:
    outcome.append("refused")
deadline = time.monotonic() + 5
while mp.active_children() and time.monotonic() < deadline:
    time.sleep(0.1)
print(outcome, len(mp.active_children()))
"""


def test_a_killed_pool_fails_its_jobs_and_starts_no_new_workers() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "['died', 'refused'] 0", r.stdout + r.stderr[-2000:]


EXIT_SCRIPT = """
import threading
from sefe_core import workers
from tests.test_workers import _sleep

assert workers.run_job(_sleep, 0, workers=2) == 0
workers.shutdown()
print([t.name for t in threading.enumerate() if t.name == "sefe-worker-progress"])
workers.run_job(_sleep, 0, workers=2)  # a pool again, left to atexit as `sefe run` leaves it
"""


def test_the_progress_listener_is_gone_when_the_pool_shuts_down() -> None:
    """Left reading its queue at interpreter exit, the listener thread printed a traceback after
    a finished run (2 of 5 cold runs) when multiprocessing's exit finalizers closed the queue."""
    r = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
    assert "Exception in thread" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
