"""`asd.server.launch`: ASD starts the rewriter server it needs and stops it again, on success,
on failure and on Ctrl-C. The server is tests/fake_rewriter.py as its own process (it answers
/health and /v1/models as vLLM does); the real vLLM server is in test_vllm.py."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_contracts import sha256_file
from sefe_core.rewriter import LaunchConfig
from sefe_core.rewriter_server import ServerStartError, ensure_server, served_models, stop_servers
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]
ASD_TASK = "03-imagenet"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.fake_rewriter", "--port", "{port}", *args]


def _launch(*args: str, **kw) -> LaunchConfig:
    return LaunchConfig(command=_fake_command(*args), env={"PYTHONPATH": str(ROOT)}, **kw)


def _pid_in(log: Path) -> int:
    return int(re.search(r"fake rewriter pid (\d+)", log.read_text()).group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "(Z)" not in Path(f"/proc/{pid}/stat").read_text()


@pytest.fixture(autouse=True)
def _no_server_left():
    yield
    stop_servers()


def test_asd_starts_the_server_uses_it_for_every_task_and_the_flow_stops_it(tmp_path) -> None:
    """The whole ASD flow with a launched server: started once (its start-up in the run log),
    the same data as a server the user started, and gone when the flow returns."""
    from flows.pipeline import asd_flow
    from sefe_core.asd import SERVER_LOG

    url = f"http://127.0.0.1:{_port()}/v1"
    cfg = small_config(
        tmp_path,
        f"benchmark.minicoin.tasks=[{ASD_TASK},04-gqa]",
        "asd.backend=openai",
        f"asd.server.base_url={url}",
        "asd.server.model=fake",
        "asd.server.retries=1",
        "asd.server.backoff_s=0.01",
    ).model_copy(deep=True)
    cfg.asd.server.launch = _launch("--ready-after", "1.5")
    out = asd_flow(cfg)
    log = cfg.run_dir / "data" / SERVER_LOG
    text = log.read_text()
    assert text.count("fake rewriter pid") == 1, text  # one server for both tasks
    assert not _alive(_pid_in(log)) and served_models(url) is None
    for task in (ASD_TASK, "04-gqa"):
        assert out[task]["converted"] == out[task]["selected"] > 0

    # a server the user runs gives the same data: how it was started is not part of the result
    from sefe_core.asd import run_asd
    from tests.fake_rewriter import FakeRewriter

    bench_dir = Path(out[ASD_TASK]["path"]).parents[1] / "benchmark"
    (bench,) = bench_dir.glob("minicoin-*")
    with FakeRewriter() as fake:
        server = cfg.asd.server.model_copy(update={"base_url": fake.url, "launch": None})
        res = run_asd(
            bench / f"{ASD_TASK}.parquet",
            bench / "images",
            tmp_path / "by-hand",
            cfg.asd.model_copy(update={"server": server}),
        )
    assert sha256_file(res.data_path) == sha256_file(out[ASD_TASK]["path"])


def test_a_failing_asd_step_still_stops_the_server(tmp_path) -> None:
    from flows.pipeline import asd_flow
    from sefe_core.asd import SERVER_LOG
    from sefe_core.rewriter import RewriterRefused

    url = f"http://127.0.0.1:{_port()}/v1"
    cfg = small_config(
        tmp_path,
        f"benchmark.minicoin.tasks=[{ASD_TASK}]",
        "asd.backend=openai",
        f"asd.server.base_url={url}",
        "asd.server.model=fake",
        "asd.server.retries=0",
    ).model_copy(deep=True)
    cfg.asd.server.launch = _launch("--mode", "http-500")
    with pytest.raises(RewriterRefused, match="grammar rejected tokens"):
        asd_flow(cfg)
    log = cfg.run_dir / "data" / SERVER_LOG
    assert not _alive(_pid_in(log)) and served_models(url) is None


def test_a_server_that_exits_is_a_clear_error_with_its_log(tmp_path) -> None:
    url = f"http://127.0.0.1:{_port()}/v1"
    launch = LaunchConfig(command=[sys.executable, "-c", "print('no GPU found, giving up'); exit(3)"])
    with pytest.raises(ServerStartError, match=r"exited with code 3 .*\n.*no GPU found, giving up"):
        ensure_server(url, "fake", launch, tmp_path / "server.log")


def test_a_server_that_never_gets_ready_is_stopped_at_the_timeout(tmp_path) -> None:
    url = f"http://127.0.0.1:{_port()}/v1"
    launch = _launch("--ready-after", "600", startup_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(
        ServerStartError, match=r"did not answer .*/health within asd.server.launch.startup_timeout_s=2 s"
    ):
        ensure_server(url, "fake", launch, tmp_path / "server.log")
    assert time.monotonic() - t0 < 30
    assert not _alive(_pid_in(tmp_path / "server.log"))


def test_a_server_of_another_model_is_named(tmp_path) -> None:
    url = f"http://127.0.0.1:{_port()}/v1"
    with pytest.raises(ServerStartError, match=r"serves \['internvl'\], not asd.server.model='fake'"):
        ensure_server(url, "fake", _launch("--model", "internvl"), tmp_path / "server.log")
    assert not _alive(_pid_in(tmp_path / "server.log"))


def test_a_server_already_running_is_used_as_it_is(tmp_path) -> None:
    from tests.fake_rewriter import FakeRewriter

    said: list[str] = []
    launch = LaunchConfig(command=[sys.executable, "-c", "raise SystemExit('must not be started')"])
    with FakeRewriter() as fake:
        assert ensure_server(fake.url, "fake", launch, tmp_path / "server.log", say=said.append) is None
        assert stop_servers() == 0 and served_models(fake.url) == ["fake"]  # still there: not ours
    assert "already answers" in said[0] and not (tmp_path / "server.log").exists()


def test_ctrl_c_while_the_server_starts_stops_it_too(tmp_path) -> None:
    """`sefe run` interrupted while its launched server is still loading: the run and the server
    (in its own session, out of reach of the terminal's Ctrl-C) are both gone within seconds."""
    import json

    url = f"http://127.0.0.1:{_port()}/v1"
    launch = {"command": _fake_command("--ready-after", "600"), "env": {"PYTHONPATH": str(ROOT)}}
    sets = [
        f"runs_root={tmp_path}", "benchmark.minicoin.n_train=24", "benchmark.minicoin.n_test=6",
        f"benchmark.minicoin.tasks=[{ASD_TASK}]", "methods=[sefe]", "workers=0",
        "asd.backend=openai", f"asd.server.base_url={url}", "asd.server.model=fake",
        f"asd.server.launch={json.dumps(launch)}",  # JSON is YAML
    ]  # fmt: skip
    log = tmp_path / "minicoin-demo" / "data" / "rewriter-server.log"
    with open(tmp_path / "sefe-run.log", "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("sefe")), "run", *[a for s in sets for a in ("--set", s)]],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and "fake rewriter pid" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "sefe-run.log"
            ).read_text()[-3000:]
            time.sleep(0.1)
        pid = _pid_in(log)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the run's group, not the server's
        assert proc.wait(timeout=60) == 128 + signal.SIGINT
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the launched server outlived the interrupted run"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if log.exists() and _alive(pid := _pid_in(log)):
            os.kill(pid, signal.SIGKILL)
    assert "starting the rewriter server" in (tmp_path / "sefe-run.log").read_text()


def test_sefe_asd_shows_the_start_and_stops_the_server(tmp_path) -> None:
    import json

    url = f"http://127.0.0.1:{_port()}/v1"
    launch = {"command": _fake_command(), "env": {"PYTHONPATH": str(ROOT)}}
    sets = [
        f"runs_root={tmp_path}", "benchmark.minicoin.n_train=24", "benchmark.minicoin.n_test=6",
        "asd.backend=openai", f"asd.server.base_url={url}", "asd.server.model=fake",
        f"asd.server.launch={json.dumps(launch)}",
    ]  # fmt: skip
    r = subprocess.run(
        [str(Path(sys.executable).with_name("sefe")), "asd", "-t", ASD_TASK, *[a for s in sets for a in ("--set", s)]],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "starting the rewriter server" in r.stdout and "rewriter server ready" in r.stdout
    assert f"stopping the rewriter server at {url}" in r.stdout
    assert not _alive(_pid_in(tmp_path / "minicoin-demo" / "data" / "rewriter-server.log"))
    assert served_models(url) is None
