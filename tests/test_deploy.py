"""prefect.yaml, deployed for real: a local `prefect server start`, a process work pool, and
`prefect deploy --all` from the repository, then the server's own view of what it accepted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path: Path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PWD": str(REPO),  # prefect.yaml's pull step: the directory `prefect deploy` ran in
        # the scheduler visits deployments every 60 s by default: a test cannot wait that long
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield api, env, tmp_path / "server.log"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def _prefect(env: dict, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_prefect_deploy_all_is_accepted_by_a_local_server(prefect_server) -> None:
    from sefe_core.config import RunConfig

    api, env, _ = prefect_server
    _prefect(env, "work-pool", "create", "sefe-process", "--type", "process")
    _prefect(env, "deploy", "--all")

    deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()
    by_name = {d["name"]: d for d in deployments}
    assert set(by_name) == {
        "minicoin-demo",
        "minicoin-mask-sweep",
        "coin-asd",
        "coin-sefe",
        "coin-report-nightly",
    }
    for d in deployments:
        assert d["work_pool_name"] == "sefe-process"
        assert d["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
        # the UI form: the flow's typed parameters, RunConfig's fields inside
        schema = d["parameter_openapi_schema"]
        assert "config" in schema["properties"]
        assert {"RunConfig", "BenchmarkConfig", "TrainConfig"} <= set(schema.get("definitions", {}))

    # the CoIN parameters are a valid RunConfig (what the UI would submit)
    sefe = by_name["coin-sefe"]["parameters"]
    cfg = RunConfig.model_validate(sefe["config"])
    assert sefe["method"] == "sefe" and cfg.benchmark.name == "coin" and cfg.train.preset == "reference"
    assert cfg.train.lora_r == 128 and cfg.asd.backend == "openai" and cfg.asd.percent == 20

    # the sweep: its axes are a form field, its points valid configs of the default
    from sefe_core.sweep import expand

    sw = by_name["minicoin-mask-sweep"]
    assert {"config", "axes", "sweep_dir"} <= set(sw["parameter_openapi_schema"]["properties"])
    assert [p.config.train.mask_percent for p in expand(RunConfig(), sw["parameters"]["axes"], REPO)] == [
        0.5,
        1,
        2,
        5,
    ]

    nightly = by_name["coin-report-nightly"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert all(
        not by_name[n]["schedules"] for n in ("minicoin-demo", "minicoin-mask-sweep", "coin-asd", "coin-sefe")
    )


def test_deployments_use_the_shipped_coin_config() -> None:
    """prefect.yaml repeats configs/coin-reference.yaml (YAML cannot include a file): no drift."""
    import yaml

    from sefe_core.config import RunConfig, load_config

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    shipped = load_config(REPO / "configs" / "coin-reference.yaml")
    for d in spec["deployments"]:
        if "config" in d["parameters"]:
            assert RunConfig.model_validate(d["parameters"]["config"]) == shipped, d["name"]


def test_the_nightly_schedule_creates_its_upcoming_runs(prefect_server) -> None:
    """A cron deployment is only useful if the server's scheduler service turns it into runs
    (SQLAlchemy 2.1 broke that service: every loop failed with a bulk-DML InvalidRequestError)."""
    api, env, server_log = prefect_server
    _prefect(env, "work-pool", "create", "sefe-process", "--type", "process")
    _prefect(env, "deploy", "--name", "coin-report-nightly")
    (nightly,) = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()

    runs: list = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not runs:
        time.sleep(1)
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}}},
            timeout=30,
        ).json()
    log = server_log.read_text()
    assert runs, f"the scheduler created no run for the cron deployment in 60 s; server log:\n{log[-3000:]}"
    assert all(r["state_type"] == "SCHEDULED" for r in runs)
    times = sorted(r["expected_start_time"] for r in runs)
    assert all(t.endswith("03:00:00Z") or "T03:00:00" in t for t in times), times
    # no server service failed along the way (the scheduler's error was logged, not raised)
    for marker in ("InvalidRequestError", "Traceback"):
        assert marker not in log, log[log.index(marker) - 1500 : log.index(marker) + 1500]


def test_ctrl_c_on_sefe_worker_cancels_its_run_and_exits(prefect_server, tmp_path: Path) -> None:
    """`prefect worker start` ignores a first Ctrl-C (Prefect 3.8); `sefe worker` cancels the run
    it is training (UI: Cancelled, nothing left running) and exits; a rerun resumes."""
    import json
    import signal
    import uuid

    from tests.conftest import SMALL
    from tests.test_resume import _processes_with

    api, env, _ = prefect_server
    _prefect(env, "work-pool", "create", "sefe-process", "--type", "process")
    _prefect(env, "deploy", "--name", "minicoin-demo")
    marker = uuid.uuid4().hex
    env = {**env, "SEFE_TEST_RUN": marker}
    sets = [f"runs_root={tmp_path / 'runs'}", *SMALL, "benchmark.minicoin.tasks=[01-scienceqa]",
            "methods=[lora]", "train.max_steps=150", "train.save_steps=5", "workers=2"]  # fmt: skip
    from sefe_core.config import load_config

    cfg = load_config(None, sets)
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 (closed below)
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("sefe")), "worker", "--pool", "sefe-process"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        params = json.dumps({"config": cfg.model_dump(mode="json")})
        out = _prefect(env, "deployment", "run", "sefe-pipeline/minicoin-demo", "--params", params).stdout
        run_id = next(ln.split()[-1] for ln in out.splitlines() if "UUID" in ln)
        task_dir = cfg.run_dir / "lora" / "task-01-scienceqa"
        deadline = time.monotonic() + 300
        while not list(task_dir.glob("checkpoints/checkpoint-*")):  # training, in the pool's workers
            assert worker.poll() is None and time.monotonic() < deadline, (
                tmp_path / "worker.log"
            ).read_text()[-3000:]
            time.sleep(0.2)
        t0 = time.monotonic()
        os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C in its terminal
        rc = worker.wait(timeout=60)
        took = time.monotonic() - t0
        left = _processes_with(f"SEFE_TEST_RUN={marker}")
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()["state_name"]
        text = (tmp_path / "worker.log").read_text()
        assert (rc, state, left) == (130, "Cancelled", []) and took < 45, (
            rc,
            state,
            left,
            took,
            text[-3000:],
        )
        assert "Cancelling 1 flow run(s) in flight" in text
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        for pid in _processes_with(f"SEFE_TEST_RUN={marker}"):
            os.kill(pid, signal.SIGKILL)
        log.close()
    assert not (task_dir / "train.json").exists()  # stopped mid-task: a rerun resumes it

    res = subprocess.run(
        [str(Path(sys.executable).with_name("sefe")), "run", *[a for s in sets for a in ("--set", s)]],
        cwd=REPO, env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    done = json.loads((task_dir / "train.json").read_text())
    assert done["global_step"] == 150 and done["steps_run"] < 150  # resumed from its checkpoint
