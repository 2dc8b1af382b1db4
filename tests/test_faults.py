"""Faults and bad input (issue 16), one per test, each against an untouched run of the same
config: a damaged or swapped file is found by its content and rebuilt by the step that made it,
so the final metrics equal the untouched run's; never re-blessed as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_contracts import sha256_file
from tests.conftest import small_config

TASKS = ["01-scienceqa", "02-textvqa", "03-imagenet"]
CONFIG = [
    f"benchmark.minicoin.tasks=[{','.join(TASKS)}]",
    "methods=[reglora]",  # adapters, projectors and masks
    "train.max_steps=3",
]


def _metrics(out: dict) -> dict:
    return json.loads(Path(out["metrics"]).read_text())["methods"]


@pytest.fixture(scope="module")
def untouched(tmp_path_factory) -> dict:
    from flows.pipeline import sefe_pipeline

    return _metrics(sefe_pipeline(small_config(tmp_path_factory.mktemp("untouched"), *CONFIG)))


@pytest.fixture
def finished(tmp_path, untouched):
    """A finished run of the same config, to damage."""
    from flows.pipeline import sefe_pipeline

    cfg = small_config(tmp_path, *CONFIG)
    assert _metrics(sefe_pipeline(cfg)) == untouched
    return cfg


def _rerun(cfg) -> dict:
    from flows.pipeline import finished_pipeline, sefe_pipeline

    assert finished_pipeline(cfg) is None, "a damaged run must not be shown as complete"
    return sefe_pipeline(cfg)


def test_truncated_benchmark_file_is_rebuilt_not_reblessed(finished, untouched) -> None:
    cfg = finished
    (bench_dir,) = (cfg.run_dir / "benchmark").iterdir()
    target = bench_dir / f"{TASKS[1]}.parquet"
    good = sha256_file(target)
    with open(target, "r+b") as f:
        f.truncate(500)
    out = _rerun(cfg)
    assert sha256_file(target) == good  # MiniCoIN is regenerated from its config
    assert _metrics(out) == untouched
    assert out["work"]["train_steps"] == 0  # same records again: nothing downstream re-runs


def test_adapter_swapped_for_another_tasks_is_trained_again(finished, untouched) -> None:
    cfg = finished
    run = cfg.run_dir / "reglora"
    first, second = (run / f"task-{t}" / "adapter" / "adapter_model.safetensors" for t in TASKS[:2])
    assert first.stat().st_size == second.stat().st_size  # a swap the size check cannot see
    shutil.copy2(first, second)  # mtime preserved too
    out = _rerun(cfg)
    assert out["work"]["train_steps"] == 3  # task 2 again; task 3 reads the same adapter as before
    assert _metrics(out) == untouched


def test_truncated_projector_is_tracked_and_trained_again(finished, untouched) -> None:
    cfg = finished
    proj = cfg.run_dir / "reglora" / f"task-{TASKS[0]}" / "projector.safetensors"
    with open(proj, "r+b") as f:
        f.truncate(proj.stat().st_size // 2)
    out = _rerun(cfg)
    assert out["work"]["train_steps"] == 3
    assert _metrics(out) == untouched


def test_finished_task_recorded_without_hashes_is_checked_for_readability(small_run, tmp_path) -> None:
    """train.json of older runs holds no hashes: a truncated adapter is still not taken as trained."""
    from sefe_core.train import TrainConfig, train_task

    _, bench, base = small_run
    cfg = TrainConfig.minicoin(max_steps=2, lora_r=4, lora_alpha=8)
    d = tmp_path / "lora" / f"task-{TASKS[0]}"
    train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d, cfg, "lora")
    info = json.loads((d / "train.json").read_text())
    del info["files"]
    (d / "train.json").write_text(json.dumps(info))
    adapter = d / "adapter" / "adapter_model.safetensors"
    good = sha256_file(adapter)
    with open(adapter, "r+b") as f:
        f.truncate(adapter.stat().st_size - 100)
    res = train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d, cfg, "lora")
    assert res.steps_run == 2 and sha256_file(adapter) == good
