"""The `openai` rewriter against real OpenAI-compatible servers, vLLM (its CPU build, in its own
environment: the `vllm_python` fixture) and `transformers serve`, on 127.0.0.1, each running the tiny LLaVA of the `small_run` fixture (an image-text-to-text model, so the image
data-URI path is exercised). A tiny model writes garbage: it must land in rejects with its raw
text, never crash the run, never be used as data. A server that is slow or goes down must end
in a clear error that keeps the shards already written, and a rerun must resume from them."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from data_contracts import INSTRUCTIONS, REJECTS
from sefe_core.asd import ASDConfig, TooManyRejects, run_asd
from sefe_core.rewriter import RewriterUnavailable, ServerConfig
from sefe_core.rewriter_served import OpenAIRewriter
from sefe_core.rewriter_server import ManagedServer
from sefe_core.vllm_backend import CPU_ENV

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(kind: str, model_dir: Path, log_path: Path, vllm_python: Path | None = None) -> ManagedServer:
    """A started `transformers serve` or vLLM (CPU build, its own environment) of `model_dir` on
    a free port, through the same launcher as `asd.server.launch`."""
    port = _port()
    # One OpenMP thread: on a busy 2-core machine torch's spinning worker threads made each
    # request of the tiny model 30-40x slower (1.2 s instead of 0.03 s).
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    if kind == "transformers":
        exe = Path(sys.executable).with_name("transformers")
        argv = [
            str(exe),
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
        ]
        model = None  # it serves what a request names
    else:
        argv = [
            str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
            # the untrained tiny model would otherwise fill a JSON reply with whitespace
            "--structured-outputs-config", '{"backend":"xgrammar","disable_any_whitespace":true}',
        ]  # fmt: skip
        env |= CPU_ENV
        model = str(model_dir)
    server = ManagedServer(argv, f"http://127.0.0.1:{port}/v1", model, log_path, env, startup_timeout_s=300)
    server.start()
    return server


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def served(request, small_run, tmp_path_factory):
    _, _, base = small_run
    vllm = request.getfixturevalue("vllm_python") if request.param == "vllm" else None
    server = serve(request.param, base.path, tmp_path_factory.mktemp("serve") / "serve.log", vllm)
    server.kind = request.param  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def _cfg(served: ManagedServer, model: Path, percent: float, **kw) -> ASDConfig:
    s = dict(
        base_url=served.base_url, model=str(model), concurrency=2, max_tokens_per_question=12, backoff_s=0.05
    )
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
        posts = served.log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
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
        match=rf"{served.base_url}/chat/completions .*after 2 attempt.*no complete reply within timeout_s=0.001 s",
    ):
        run_asd(bench.task_file("04-gqa"), bench.image_root, tmp_path, cfg)
    assert not (tmp_path / "04-gqa.parquet").exists()


def test_server_going_down_keeps_saved_shards_and_a_rerun_resumes(
    request, small_run, served, tmp_path
) -> None:
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
    assert served.base_url in msg and "after 3 attempt" in msg and "1 of 4 shards are saved" in msg
    saved = sorted(tmp_path.glob(f"shards/{task}/*/*.parquet"))
    assert [p.name for p in saved] == ["00000.parquet", "00000.rejects.parquet"]
    mtime = saved[0].stat().st_mtime_ns
    assert len(INSTRUCTIONS.read(saved[0])) + len(REJECTS.read(saved[1])) == 3

    vllm = request.getfixturevalue("vllm_python") if served.kind == "vllm" else None
    again = serve(served.kind, base.path, tmp_path / "serve2.log", vllm)  # a fresh one, on another port
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
