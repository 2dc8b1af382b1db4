"""The `openai` rewriter against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1
running the tiny LLaVA of the `small_run` fixture (an image-text-to-text model, so the image
data-URI path is exercised). A tiny model writes garbage: it must land in rejects with its raw
text, never crash the run, never be used as data. A server that is slow or goes down must end
in a clear error that keeps the shards already written, and a rerun must resume from them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from data_contracts import INSTRUCTIONS, REJECTS
from sefe_core.asd import ASDConfig, TooManyRejects, run_asd
from sefe_core.rewriter import RewriterUnavailable, ServerConfig
from sefe_core.rewriter_served import OpenAIRewriter

pytestmark = pytest.mark.slow


class Served:
    """`transformers serve <model_dir>` as a subprocess; stopped by its pid."""

    def __init__(self, model_dir: Path, log_path: Path, timeout_s: float = 120):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        exe = Path(sys.executable).with_name("transformers")
        # One OpenMP thread: on a busy 2-core machine torch's spinning worker threads made each
        # request of the tiny model 30-40x slower (1.2 s instead of 0.03 s).
        threads = os.environ.get("OMP_NUM_THREADS", "1")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": threads}
        cmd = [str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"transformers serve exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"transformers serve not ready after {timeout_s} s:\n{self.log()[-3000:]}")
            time.sleep(0.25)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def served(small_run, tmp_path_factory):
    _, _, base = small_run
    server = Served(base.path, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield server
    finally:
        server.stop()


def _cfg(served: Served, model: Path, percent: float, **kw) -> ASDConfig:
    s = dict(base_url=served.url, model=str(model), concurrency=2, max_tokens_per_question=12, backoff_s=0.05)
    s.update(kw.pop("server", {}))
    return ASDConfig(percent=percent, backend="openai", server=ServerConfig(**s), **kw)


def test_garbage_from_a_served_model_lands_in_rejects(small_run, served, tmp_path) -> None:
    _, bench, base = small_run
    for task in ("03-imagenet", "06-grounding"):
        cfg = _cfg(served, base.path, percent=25, max_reject_fraction=1.0)
        rw = OpenAIRewriter(cfg.server)
        res = run_asd(bench.task_file(task), bench.image_root, tmp_path, cfg, rewriter=rw)
        assert res.selected == 6 == res.converted + res.rejected
        rows = [r for r in INSTRUCTIONS.read_records(res.data_path) if r.origin == "asd"]
        rejects = REJECTS.read_records(res.rejects_path)
        # Only rows that need nothing from the model (grounding's inverse short question) survive.
        assert all(r.style == "short" and task == "06-grounding" for r in rows)
        assert len(rejects) == res.rejected > 0
        for r in rejects:
            assert r.step == "asd" and r.raw_text.strip(), r
            assert "JSON" in r.reason or "answers" in r.reason, r.reason
        # One HTTP request per image, each answered (200) by the real server.
        posts = served.log().count('"POST /v1/chat/completions HTTP/1.1" 200')
        assert (
            rw.stats["requests"] == len({r.id.split("-asd-")[0] for r in rejects})
            and posts >= rw.stats["requests"]
        )
        assert all(r.retryable for r in rejects)  # not the asked JSON: worth sending again

    # under the default limit, a task mostly rejected fails; the rerun sent the rejects again
    cfg = _cfg(served, base.path, percent=25)
    rw = OpenAIRewriter(cfg.server)
    with pytest.raises(TooManyRejects, match=r"03-imagenet: 6 of 6 selected rows rejected .*sent again"):
        run_asd(bench.task_file("03-imagenet"), bench.image_root, tmp_path, cfg, rewriter=rw)
    assert rw.stats["requests"] == 6


def test_slow_server_is_a_clear_error_after_the_retry_budget(small_run, served, tmp_path) -> None:
    _, bench, base = small_run
    cfg = _cfg(
        served, base.path, percent=10, server=dict(timeout_s=0.001, retries=1, max_tokens_per_question=64)
    )
    with pytest.raises(
        RewriterUnavailable,
        match=rf"{served.url}/chat/completions .*after 2 attempt.*no complete reply within timeout_s=0.001 s",
    ):
        run_asd(bench.task_file("04-gqa"), bench.image_root, tmp_path, cfg)
    assert not (tmp_path / "04-gqa.parquet").exists()


def test_server_going_down_keeps_saved_shards_and_a_rerun_resumes(small_run, served, tmp_path) -> None:
    """Last in this file: it stops the module's server."""
    _, bench, base = small_run
    task = "03-imagenet"  # every style of it needs the model, so every shard sends requests
    cfg = _cfg(served, base.path, percent=50, shard_size=3, server=dict(retries=2))

    def stop_after_first_shard(done: int, total: int) -> None:
        if done == 1:
            served.stop()

    with pytest.raises(RewriterUnavailable) as err:
        run_asd(bench.task_file(task), bench.image_root, tmp_path, cfg, progress=stop_after_first_shard)
    msg = str(err.value)
    assert served.url in msg and "after 3 attempt" in msg and "1 of 4 shards are saved" in msg
    saved = sorted(tmp_path.glob(f"shards/{task}/*/*.parquet"))
    assert [p.name for p in saved] == ["00000.parquet", "00000.rejects.parquet"]
    mtime = saved[0].stat().st_mtime_ns
    assert len(INSTRUCTIONS.read(saved[0])) + len(REJECTS.read(saved[1])) == 3

    again = Served(base.path, tmp_path / "serve2.log")  # a fresh server, on another port
    try:
        # the tiny model's garbage is retryable: kept as it is here, this test is about resuming
        keep = dict(retry_rejects="none", max_reject_fraction=1.0)
        res = run_asd(
            bench.task_file(task),
            bench.image_root,
            tmp_path,
            _cfg(again, base.path, 50, shard_size=3, **keep),
        )
    finally:
        again.stop()
    assert res.shards == 4 and res.shards_reused == 1 and saved[0].stat().st_mtime_ns == mtime
    assert res.selected == 12 == res.converted + res.rejected
