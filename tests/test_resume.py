"""`sefe run` killed with SIGKILL at several points (during ASD, mid-training, during evaluation),
rerun each time: it finishes, what was done before a kill is reused, and the final metrics equal
an uninterrupted run's. The kills come from failpoints (sefe_core/failpoints.py): the process
SIGKILLs itself at a named point, so every kill lands where the test says, not at random."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL, small_config

TASKS = ["01-scienceqa", "02-textvqa", "03-imagenet"]
N_TEST = 6
CONFIG = [
    *SMALL,
    f"benchmark.minicoin.tasks=[{','.join(TASKS)}]",
    f"benchmark.minicoin.n_test={N_TEST}",
    "methods=[sefe]",  # ASD data + RegLoRA masks + evaluation: every kind of step
    "asd.shard_size=2",  # ~3 shards per task
    "train.max_steps=3",
    "train.save_steps=1",  # a checkpoint after every step
]


def _sefe_run(runs_root: Path, failpoints: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SEFE_FAILPOINTS", None)
    if failpoints:
        env["SEFE_FAILPOINTS"] = failpoints
    # in worker processes, as `sefe run` runs by default (the uninterrupted run is in-process)
    sets = [a for s in [*CONFIG, f"runs_root={runs_root}", "workers=2"] for a in ("--set", s)]
    log = runs_root / f"sefe-run-{failpoints or 'clean'}.log"
    with open(log, "w") as out:  # a file, not a pipe: an orphaned server child would hold a pipe open
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("sefe")), "run", *sets],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so its Prefect server can be stopped
        )
        try:
            proc.wait(timeout=600)
        finally:
            try:  # the run's workers (its server has its own session and follows it out)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "report" / "metrics.json").read_text())["methods"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    from flows.pipeline import sefe_pipeline

    cfg = small_config(tmp_path_factory.mktemp("reference"), *CONFIG[len(SMALL) :])
    out = sefe_pipeline(cfg)
    assert out["work"]["train_steps"] == 3 * len(TASKS)
    return _metrics(cfg.run_dir)


def test_killed_three_times_then_resumed_equals_an_uninterrupted_run(tmp_path: Path, uninterrupted) -> None:
    run_dir = tmp_path / "minicoin-demo"
    data, sefe = run_dir / "data", run_dir / "sefe"

    # 1. killed during ASD: task 1's three shards are written, task 2's first one too
    r = _sefe_run(tmp_path, "asd.shard:4")
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:]
    assert (data / f"{TASKS[0]}.parquet").exists() and not (data / f"{TASKS[1]}.parquet").exists()
    assert len(list((data / "shards").rglob("*.rejects.parquet"))) == 4
    assert not sefe.exists()

    # 2. killed mid-training: task 1 done (3 checkpoints), task 2 at its 2nd checkpoint
    r = _sefe_run(tmp_path, "train.checkpoint:5")
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:]
    t1, t2 = sefe / f"task-{TASKS[0]}", sefe / f"task-{TASKS[1]}"
    assert (t1 / "train.json").exists() and (t1 / "predictions.parquet").exists()
    assert not (t2 / "train.json").exists()
    assert (t2 / "checkpoints" / "checkpoint-2").is_dir()

    # 3. killed during evaluation: stage 3 has scored task 1 of its 3 (not written yet)
    r = _sefe_run(tmp_path, "eval.task:4")
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:]
    info2 = json.loads((t2 / "train.json").read_text())
    assert info2["resumed_from"].endswith("checkpoint-2") and info2["steps_run"] == 1
    assert (sefe / f"task-{TASKS[2]}" / "train.json").exists()
    assert not (sefe / f"task-{TASKS[2]}" / "predictions.parquet").exists()

    # 4. finishes: only stage 3's evaluation was left
    r = _sefe_run(tmp_path, None)
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"Work done now: 0 training steps, {len(TASKS) * N_TEST} generations" in r.stdout
    for col in ("MFT", "MFN", "MAA", "BWT", "superficial", "essential"):
        assert col in r.stdout
    assert f"Report: {run_dir / 'report' / 'report.md'}" in r.stdout.replace("\n", "")
    assert _metrics(run_dir) == uninterrupted

    # 5. a rerun of the finished run: no work, read from the stored results
    r = _sefe_run(tmp_path, None)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "Run already complete" in r.stdout and "Work done now: 0 training steps, 0 generations" in r.stdout


def _processes_with(marker: str) -> list[int]:
    """Every live process whose environment holds `marker` (the run, its workers, its server)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            pass
    return found


def _cmdline(pid: int) -> str:
    """What a process left behind is, for the failure message."""
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid}: (gone)"


def _interrupt(runs_root: Path, after: Path, how: str) -> tuple[int, float, list[str]]:
    """Start `sefe run`, wait until `after` exists, interrupt it `how`; (rc, seconds it took to
    exit, processes of it still alive 5 s later)."""
    import time
    import uuid

    marker = f"SEFE_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "COLUMNS": "200", marker.split("=")[0]: marker.split("=")[1]}
    env.pop("SEFE_FAILPOINTS", None)
    sets = [a for s in [*CONFIG, f"runs_root={runs_root}", "workers=2"] for a in ("--set", s)]
    with open(runs_root / f"sefe-run-{how}.log", "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("sefe")), "run", *sets],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            while not after.exists():
                assert proc.poll() is None, (runs_root / f"sefe-run-{how}.log").read_text()[-3000:]
                time.sleep(0.05)
            t0 = time.monotonic()
            {
                "sigint-group": lambda: os.killpg(proc.pid, signal.SIGINT),  # Ctrl-C in a terminal
                "sigterm": lambda: os.kill(proc.pid, signal.SIGTERM),
                "sigkill": lambda: os.kill(proc.pid, signal.SIGKILL),
            }[how]()
            rc = proc.wait(timeout=60)
            took = time.monotonic() - t0
            deadline = time.monotonic() + 5  # a killed run's server and workers notice within ~1 s
            while _processes_with(marker) and time.monotonic() < deadline:
                time.sleep(0.1)
            return rc, took, [_cmdline(pid) for pid in _processes_with(marker)]
        finally:
            for pid in _processes_with(marker):  # whatever a failing assertion leaves behind
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_and_sigterm_stop_the_run_at_once_leave_nothing_and_the_rerun_resumes(
    tmp_path: Path, uninterrupted
) -> None:
    sefe = tmp_path / "minicoin-demo" / "sefe"
    rc, took, left = _interrupt(tmp_path, sefe / f"task-{TASKS[0]}" / "train.json", "sigint-group")
    assert (rc, left) == (128 + signal.SIGINT, []) and took < 10, (rc, took, left)
    log = (tmp_path / "sefe-run-sigint-group.log").read_text()
    assert "SIGINT: stopping the run" in log and "Traceback" not in log and "leaked" not in log

    rc, took, left = _interrupt(tmp_path, sefe / f"task-{TASKS[1]}" / "train.json", "sigterm")
    assert (rc, left) == (128 + signal.SIGTERM, []) and took < 10, (rc, took, left)

    # kill -9 cannot be handled: the run's Prefect server and workers exit on their own
    rc, _, left = _interrupt(tmp_path, sefe / f"task-{TASKS[2]}" / "train.json", "sigkill")
    assert (rc, left) == (-signal.SIGKILL, [])

    r = _sefe_run(tmp_path, None)
    assert r.returncode == 0, r.stdout[-3000:]
    assert _metrics(tmp_path / "minicoin-demo") == uninterrupted
