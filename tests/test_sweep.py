"""Sweeps: axes expand into validated points, and a real two-axis sweep (Prefect's local server)
runs every point, shares exactly the steps whose keys agree, and writes its report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from sefe_core import sweep
from sefe_core.config import RunConfig, load_config

TASKS = "[01-scienceqa,02-textvqa]"


def _base(root: Path) -> RunConfig:
    """Two tasks, two methods, a few steps: the shipped base (copied, not built)."""
    return load_config(
        None,
        [
            f"runs_root={root}",
            "experiment=sw",
            f"benchmark.minicoin.tasks={TASKS}",
            "benchmark.minicoin.n_train=24",
            "benchmark.minicoin.n_test=6",
            "train.max_steps=3",  # the penalty needs a non-zero ΔW (step 1 is warm-up at lr 0)
            "methods=[lora,reglora]",
            "workers=0",
        ],
    )


def test_parse_axis_values_are_yaml() -> None:
    assert sweep.parse_axis("asd.percent=10,20,40") == ("asd.percent", [10, 20, 40])
    assert sweep.parse_axis("methods=[lora,sefe],[lora]") == ("methods", [["lora", "sefe"], ["lora"]])
    with pytest.raises(ValueError, match="field=value1"):
        sweep.parse_axis("asd.percent")
    with pytest.raises(ValueError, match="given twice"):
        sweep.values_of(["seed=0,1", "seed=2"])


def test_expand_names_validates_and_sets_every_seed(tmp_path: Path) -> None:
    base = _base(tmp_path)
    points = sweep.expand(base, {"train.mask_percent": [1, 5], "seed": [0, 3]}, tmp_path / "s")
    assert [p.name for p in points] == [
        "train.mask_percent=1_seed=0",
        "train.mask_percent=1_seed=3",
        "train.mask_percent=5_seed=0",
        "train.mask_percent=5_seed=3",
    ]
    p = points[1]
    assert p.config.train.mask_percent == 1 and p.config.run_dir == (tmp_path / "s" / p.name).absolute()
    assert (p.config.benchmark.minicoin.seed, p.config.train.seed, p.config.asd.seed) == (3, 3, 3)
    assert p.config.train.lora_r == base.train.lora_r  # the rest is the base config's
    with pytest.raises(ValueError, match="point train.mask_pct=1: train.mask_pct: Extra inputs"):
        sweep.expand(base, {"train.mask_pct": [1]}, tmp_path / "s")
    olora = base.model_copy(update={"methods": ["olora"]})
    assert sweep.expand(olora, {"train.method_settings.olora.lambda_orth": [0.1, 1]}, tmp_path / "s")
    with pytest.raises(
        ValueError, match=r"point train.method_settings.olora.lambda_ort=1: train.method_settings.olora"
    ):
        sweep.expand(olora, {"train.method_settings.olora.lambda_ort": [1]}, tmp_path / "s")
    with pytest.raises(ValueError, match=r"point train.mask_percent=500.*mask_percent"):
        sweep.expand(base, {"train.mask_percent": [1, 500]}, tmp_path / "s")
    with pytest.raises(ValueError, match="repeats a value"):
        sweep.expand(base, {"asd.percent": [10, 10]}, tmp_path / "s")
    with pytest.raises(ValueError, match="at least one axis"):
        sweep.expand(base, {}, tmp_path / "s")


# Per point: prepare-benchmark, prepare-base; lora: train x2, evaluate x2, method report;
# reglora: train x2, after-task (mask) x2, evaluate x2, method report; the comparison report.
STEPS_PER_POINT = 15
# What the keys let a point take from an earlier one (axes: M, then λ), per step:
#   (M=1, λ=2):   prepare x2, lora's trainings and stages, reglora's task 1 (λ weighs nothing
#                 there), its mask and stage 1
#   (M=5, λ=0.5): the same but task 1's mask (another M)
#   (M=5, λ=2):   as (M=1, λ=2), task 1's M=5 mask from the point before
# (the reports are keyed by the predictions' content: lora's is always shared, the others
# whenever a tiny run's predictions happen to coincide, so they are not counted here)
KEYED = ("prepare-benchmark", "prepare-base-model", "train", "after-task", "evaluate")
SHARED = [
    {},
    {"prepare-benchmark": 1, "prepare-base-model": 1, "train": 3, "after-task": 1, "evaluate": 3},
    {"prepare-benchmark": 1, "prepare-base-model": 1, "train": 3, "evaluate": 3},
    {"prepare-benchmark": 1, "prepare-base-model": 1, "train": 3, "after-task": 1, "evaluate": 3},
]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from flows.sweep import sefe_sweep

    root = tmp_path_factory.mktemp("sweep")
    axes = {"train.mask_percent": [1.0, 5.0], "train.reg_lambda": [0.5, 2.0]}
    out = sefe_sweep(_base(root), axes, str(root / "sw-sweep"))
    return root / "sw-sweep", axes, out


def test_sweep_shares_the_steps_whose_keys_agree(swept) -> None:
    sweep_dir, axes, out = swept
    summary = json.loads((sweep_dir / "report" / "sweep.json").read_text())
    per_point, by_step = summary["steps"]["per_point"], summary["steps"]["by_step"]
    for p, expected in zip(per_point, SHARED, strict=True):
        steps = by_step[p["point"]]
        assert {s: steps[s]["shared"] for s in KEYED if steps.get(s, {}).get("shared")} == expected, p
        assert sum(steps[s]["run"] + steps[s]["reused"] for s in steps) == STEPS_PER_POINT
        assert p["run"] + p["reused"] == STEPS_PER_POINT and p["reused"] == p["shared"]  # a first sweep
    for p in per_point[1:]:
        assert by_step[p["point"]]["method-report"]["shared"] >= 1  # lora's
    total = summary["steps"]["total"]
    assert out["steps"] == total and total["run"] + total["reused"] == 4 * STEPS_PER_POINT
    # a shared step's files are the earlier point's (hard links), not copies or retrained ones
    first, second = (sweep_dir / p["point"] for p in per_point[:2])
    for rel in (
        "lora/task-02-textvqa/adapter/adapter_model.safetensors",
        "reglora/task-01-scienceqa/mask.safetensors",
    ):
        assert os.path.samefile(first / rel, second / rel), rel
    assert not os.path.samefile(
        first / "reglora/task-02-textvqa/adapter/adapter_model.safetensors",
        second / "reglora/task-02-textvqa/adapter/adapter_model.safetensors",
    )  # λ acts from task 2 on


def test_every_point_is_a_complete_run_of_its_own(swept) -> None:
    from flows.pipeline import finished_pipeline

    sweep_dir, axes, _ = swept
    for p in sweep.expand(_base(sweep_dir.parent), axes, sweep_dir):
        assert finished_pipeline(p.config) is not None, p.name  # `sefe run` on it runs nothing


def test_sweep_report_table_and_plots(swept) -> None:
    sweep_dir, axes, out = swept
    report = sweep_dir / "report"
    table = pd.read_parquet(report / "points.parquet")
    assert len(table) == 4 * 2 and set(table["method"]) == {"lora", "reglora"}
    assert {"train.mask_percent", "train.reg_lambda", "MFT", "BWT", "superficial forgetting"} <= set(table)
    # lora does not read M or λ: the same numbers at every point; reglora's differ with λ
    lora = table[table["method"] == "lora"]
    assert lora["MAA"].nunique() == 1
    for axis in axes:
        png = report / f"axis-{axis}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (report / "sweep.md").read_text()
    assert "train.mask_percent=5.0_train.reg_lambda=2.0" in md and f"{out['steps']['run']} steps ran" in md


def test_rerun_of_a_finished_sweep_runs_nothing(swept) -> None:
    from flows.sweep import sefe_sweep

    sweep_dir, axes, _ = swept
    again = sefe_sweep(_base(sweep_dir.parent), axes, str(sweep_dir))
    assert again["steps"] == {"run": 0, "reused": 4 * STEPS_PER_POINT, "shared": 0}


def test_sefe_sweep_command(tmp_path: Path) -> None:
    """As a user runs it: axes from a file and from --axis, one command, the report at the end;
    a bad axis is a one-line error before anything runs."""
    from tests.test_cli import _sefe

    sets = [
        f"benchmark.minicoin.tasks=[{TASKS.strip('[]').split(',')[0]}]",
        "benchmark.minicoin.n_train=16",
        "benchmark.minicoin.n_test=4",
        "train.max_steps=2",
        "methods=[lora,reglora]",
        "workers=0",
    ]
    args = [a for s in sets for a in ("--set", s)]
    bad = _sefe("sweep", *args, "--axis", "train.mask_pct=1,2", cwd=tmp_path)
    assert bad.returncode == 2 and "Invalid sweep" in bad.stdout and "mask_pct" in bad.stdout, bad.stdout
    assert not (tmp_path / "runs").exists()
    (tmp_path / "axes.yaml").write_text("axes:\n  train.mask_percent: [1, 5]\n")
    res = _sefe("sweep", *args, "--axes", "axes.yaml", "--axis", "train.seed=0,1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 points over train.mask_percent, train.seed" in res.stdout
    report = tmp_path / "runs" / "minicoin-demo-sweep" / "report"
    assert (report / "sweep.md").exists() and (report / "axis-train.seed.png").exists()
    assert "reused from the cache" in res.stdout and "Report:" in res.stdout


def test_a_damaged_point_is_not_shared(swept) -> None:
    """A step is never taken from a point whose files changed since: a new point that comes
    first runs it itself and becomes the index's source; the damaged point repairs itself."""
    from data_contracts import sha256_file
    from flows.sweep import sefe_sweep

    sweep_dir, axes, _ = swept
    source = sweep_dir / "train.mask_percent=1.0_train.reg_lambda=0.5"
    adapter = "lora/task-01-scienceqa/adapter/adapter_model.safetensors"
    sha = sha256_file(source / adapter)
    (source / adapter).unlink()  # its hard links in the other points are untouched
    wider = {**axes, "train.mask_percent": [0.5, *axes["train.mask_percent"]]}  # new points first
    sefe_sweep(_base(sweep_dir.parent), wider, str(sweep_dir))
    by_step = json.loads((sweep_dir / "report" / "sweep.json").read_text())["steps"]["by_step"]
    first = by_step["train.mask_percent=0.5_train.reg_lambda=0.5"]
    assert first["train"]["run"] >= 1  # lora's task 1 (and reglora's) trained here, not taken
    assert by_step["train.mask_percent=0.5_train.reg_lambda=2.0"]["train"]["shared"] >= 2
    assert by_step[source.name]["train"]["run"] == 1  # its own stale lora task 1, nothing else
    assert sha256_file(source / adapter) == sha  # retrained to the same adapter
    from tasks.caching import _usable_source

    index = sweep_dir / sweep.INDEX_DIR
    assert all(
        _usable_source(index, e.name) is not None for e in index.iterdir()
    )  # none names a damaged point
