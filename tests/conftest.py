"""Shared fixtures. Everything is built offline, in temp dirs; nothing touches a model hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect: a private home (database, settings) per test session, and no analytics (its
# "database is locked" noise); flows then run on Prefect's local ephemeral server.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sefe-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# The local server takes 20-30 s to start on a 2-core machine (Prefect's default timeout is 20 s).
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ.pop("PREFECT_API_URL", None)

from sefe_core.config import RunConfig, load_config  # noqa: E402
from sefe_core.prepare import Benchmark, ensure_base_model, ensure_benchmark  # noqa: E402
from sefe_core.tiny_vlm import BaseModel  # noqa: E402

# Small enough for a 2-core CI machine; the same code paths as the default.
SMALL = [
    "benchmark.minicoin.n_train=24",
    "benchmark.minicoin.n_test=6",
    "model.tiny.pretrain_samples=1600",
    "model.tiny.curriculum_samples=[320,160,320]",
    "model.tiny.pretrain_heldout=64",
    "model.tiny.pretrain_epochs=1",
    "model.tiny.vision_steps=60",
    "workers=0",  # in-process: a spawned worker's imports cost more than these tiny jobs
]


def small_config(runs_root: Path, *extra: str) -> RunConfig:
    return load_config(None, [f"runs_root={runs_root}", *SMALL, *extra])


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Benchmark, BaseModel]:
    """A small MiniCoIN and a briefly pre-trained tiny base model, built once per session."""
    cfg = small_config(tmp_path_factory.mktemp("runs"))
    return cfg, ensure_benchmark(cfg), ensure_base_model(cfg)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of vLLM's environment ($SEFE_VLLM_PYTHON or .vllm-env, built by
    .ci/vllm-cpu-env.sh, which CI runs): the real-vLLM tests skip, saying so, where there is none."""
    from sefe_core.vllm_backend import VLLMError, vllm_python

    try:
        return vllm_python()
    except VLLMError as e:
        pytest.skip(f"no vLLM environment: {e}")


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_temporary_server():
    """Stop the Prefect server the flows of this session started while pytest's streams are
    open (Prefect's own atexit stop logs to a closed stream: a "Logging error" traceback)."""
    yield
    from prefect.server.api.server import SubprocessASGIServer

    from flows.server import flush_logs

    flush_logs()  # the last log lines, while the server is there to take them
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
