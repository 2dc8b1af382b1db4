"""The Prefect DAG, run for real (local ephemeral server): the whole sequence, then a rerun that
must do no work, a config change that must redo exactly evaluation, and the run-directory lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sefe_core.runlock import RunDirectoryBusy, run_lock
from tests.conftest import small_config

N_TEST = 6
TINY = [
    "train.max_steps=3",
    "methods=[lora,sefe]",
    f"benchmark.minicoin.n_test={N_TEST}",
]  # 3 steps: the penalty needs a non-zero ΔW (step 1 is warm-up at lr 0)
GENERATIONS = 2 * 36 * N_TEST  # 2 methods x (1 + 2 + ... + 8) task-evaluations x N_TEST samples


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from flows.pipeline import sefe_pipeline

    cfg = small_config(tmp_path_factory.mktemp("pipeline"), *TINY)
    state = sefe_pipeline(cfg, return_state=True)
    FLOW_RUNS.append(state.state_details.flow_run_id)
    return cfg, state.result()


FLOW_RUNS: list = []  # the first run's id (its artifacts)


def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_pipeline_runs_every_step(first_run) -> None:
    cfg, out = first_run
    assert out["work"] == {"train_steps": 2 * 8 * 3, "generations": GENERATIONS}
    run = cfg.run_dir
    for method in ("lora", "sefe"):
        for d in sorted((run / method).glob("task-*")):
            assert (d / "adapter" / "adapter_model.safetensors").exists()
            # a mask only where the method saves one after a task (RegLoRA; sefe = reglora+asd)
            assert (d / "mask.safetensors").exists() == (method == "sefe")
            assert (d / "predictions.parquet").exists()
        assert len(list((run / method).glob("task-*"))) == 8
        assert (run / method / "report" / "report.md").exists()
    metrics = json.loads(Path(out["metrics"]).read_text())
    assert set(metrics["methods"]) == {"lora", "sefe"}
    assert len(list((run / "data").glob("*.rejects.parquet"))) == 8  # ASD ran once, for sefe


def test_the_ui_gets_one_progress_card_per_phase_and_a_readable_report(first_run) -> None:
    """Artifacts a person reads in the UI: progress per (method, phase) updated in place, not
    one card per step; the headline table in run order; the report with its plots inlined."""
    cfg, _ = first_run
    arts = _artifacts(FLOW_RUNS[0])
    progress = {}
    for a in arts:
        if a.type == "progress":
            assert a.key not in progress, f"two progress cards for {a.key}"
            progress[a.key] = a
    assert {"asd", "train-lora", "train-sefe", "evaluate-lora", "evaluate-sefe", "base-model"} <= set(
        progress
    )
    for key in ("train-lora", "train-sefe", "evaluate-lora", "evaluate-sefe"):
        assert float(progress[key].data) == 100.0, (key, progress[key].data)
        assert "task 8/8" in progress[key].description or "stage 8/8" in progress[key].description
        assert progress[key].description.startswith("100% - "), progress[key].description
    assert len(progress) <= 8  # base model, ASD, and train + evaluate per method

    tables = {a.key: a for a in arts if a.type == "table"}
    rows = (
        json.loads(tables["sefe-metrics"].data)
        if isinstance(tables["sefe-metrics"].data, str)
        else tables["sefe-metrics"].data
    )
    assert [r["method"] for r in rows] == ["lora", "sefe"]  # run order
    assert set(rows[0]) == {
        "method",
        "stages",
        "MFT",
        "MFN",
        "MAA",
        "BWT",
        "superficial forgetting",
        "essential forgetting",
    }
    assert "sefe-metrics-full" in tables

    (report,) = [a for a in arts if a.type == "markdown" and a.key == "sefe-report"]
    assert report.data.count("](data:image/png;base64,") >= 3  # metrics, forgetting, matrices
    assert "](../" not in report.data and "](metrics.png)" not in report.data
    assert str(cfg.run_dir.absolute()) in report.data


def test_rerun_does_no_work(first_run) -> None:
    from flows.pipeline import finished_pipeline, sefe_pipeline

    cfg, out = first_run
    again = sefe_pipeline(cfg)
    assert again["work"] == {"train_steps": 0, "generations": 0}
    assert again["sha256"] == out["sha256"]
    # and without Prefect's engine: the stored results alone (what a `sefe run` rerun shows)
    assert finished_pipeline(cfg)["sha256"] == out["sha256"]


def test_changing_mask_percent_reruns_masks_and_what_reads_them(first_run) -> None:
    """`mask_percent` is read by the mask steps; only the penalised method (sefe) reads masks when
    training tasks 2..8, whose evaluations follow. Plain LoRA trains and evaluates nothing."""
    from flows.pipeline import finished_pipeline, sefe_pipeline

    cfg, out = first_run
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"mask_percent": 5.0})})
    assert finished_pipeline(changed) is None
    lora_adapters = sorted(
        p.stat().st_mtime_ns for p in (cfg.run_dir / "lora").rglob("adapter_model.safetensors")
    )
    res = sefe_pipeline(changed)
    assert res["work"] == {"train_steps": 7 * 3, "generations": sum(range(2, 9)) * N_TEST}
    assert sorted(
        p.stat().st_mtime_ns for p in (cfg.run_dir / "lora").rglob("adapter_model.safetensors")
    ) == (lora_adapters)
    # back to the first value: cached results whose files the change replaced are stale and run
    # again (the masks, so the tasks they shape); an evaluation whose predictions came out
    # byte-identical under both values is still what its result says (files are checked by
    # content) and is kept. The run ends where it started.
    back = sefe_pipeline(cfg)
    assert back["work"]["train_steps"] == res["work"]["train_steps"]
    assert back["work"]["generations"] <= res["work"]["generations"]
    assert back["sha256"] == out["sha256"]


def test_changing_an_eval_field_reruns_only_evaluation(first_run) -> None:
    from flows.pipeline import sefe_pipeline

    cfg, out = first_run
    changed = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 5})})
    res = sefe_pipeline(changed)
    assert res["work"] == {"train_steps": 0, "generations": GENERATIONS}
    assert res["sha256"] == out["sha256"]  # same answers at another batch size: same metrics


def test_second_run_on_the_same_directory_fails_fast(first_run) -> None:
    from flows.pipeline import sefe_pipeline

    cfg, _ = first_run
    with run_lock(cfg.run_dir), pytest.raises(RunDirectoryBusy, match="in use by another run"):
        sefe_pipeline(cfg)


def test_sefe_eval_redoes_only_missing_stages(first_run) -> None:
    """`sefe eval` on the pipeline's run directory: stages whose predictions are current for the
    config (the flow's stored evaluation results, same keys) are kept, a deleted one is generated
    again (same answers: same file content)."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.pipeline import sefe_pipeline
    from tests.conftest import SMALL

    cfg, _ = first_run
    sefe_pipeline(cfg)  # current again for this config (tests above evaluated under other settings)
    pred = cfg.run_dir / "lora" / "task-03-imagenet" / "predictions.parquet"
    before = pred.read_bytes()
    pred.unlink()
    sets = [a for s in [*SMALL, *TINY, f"runs_root={cfg.runs_root}"] for a in ("--set", s)]
    res = CliRunner().invoke(app, ["eval", "--method", "lora", *sets], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert res.output.count("kept") == 7 and pred.exists()
    assert pred.read_bytes() == before  # greedy answers, deterministic Parquet: the same file


def test_sefe_train_and_eval_run_the_dags_steps_that_the_flow_reuses(tmp_path) -> None:
    """One driver: `sefe train` runs the DAG's training steps here (tasks up to --until), `sefe
    run`'s flow then finds them as cache hits (no training), and `sefe eval` keeps its stages."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.pipeline import sefe_pipeline
    from tests.conftest import SMALL

    extra = ["train.max_steps=2", "methods=[reglora]", "benchmark.minicoin.tasks=[01-scienceqa,03-imagenet]"]
    sets = [a for s in [*SMALL, *extra, f"runs_root={tmp_path}"] for a in ("--set", s)]
    runner, env = CliRunner(), {"COLUMNS": "200"}
    first = runner.invoke(app, ["train", "-m", "reglora", "--until", "01-scienceqa", *sets], env=env)
    assert first.exit_code == 0, first.output
    cfg = small_config(tmp_path, *extra)
    d1, d3 = (cfg.run_dir / "reglora" / f"task-{t}" for t in ("01-scienceqa", "03-imagenet"))
    assert (d1 / "train.json").exists() and (d1 / "mask.safetensors").exists() and not d3.exists()
    second = runner.invoke(app, ["train", "-m", "reglora", *sets], env=env)
    assert second.exit_code == 0, second.output
    assert second.output.count("reused") == 1 and (d3 / "train.json").exists()
    out = sefe_pipeline(cfg)
    assert out["work"] == {"train_steps": 0, "generations": (1 + 2) * 6}  # evaluation only
    again = runner.invoke(app, ["eval", "-m", "reglora", *sets], env=env)
    assert again.exit_code == 0, again.output
    assert again.output.count("kept") == 2
    bad = runner.invoke(app, ["train", "-m", "reglora", "--until", "99-nothing", *sets], env=env)
    assert bad.exit_code == 2 and "Unknown task" in bad.output


def test_nightly_report_before_any_prediction_says_so_without_failing(tmp_path, caplog) -> None:
    from flows.pipeline import report_flow

    cfg = small_config(tmp_path)
    with caplog.at_level("WARNING"):
        state = report_flow(cfg, return_state=True)
    assert state.is_completed() and state.result()["dir"] is None
    (msg,) = [r.getMessage() for r in caplog.records if "nothing to report yet" in r.getMessage()]
    assert str(cfg.run_dir) in msg and "coin-sefe" in msg
