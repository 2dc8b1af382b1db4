"""Run report: every file is written, the markdown table matches metrics.json, and the numbers are
the ones computed from the predictions files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from data_contracts import METRIC_TABLE, PredictionRecord
from flows.cli import app
from sefe_core.evaluate import predictions_path, write_predictions
from sefe_core.metrics import cl_metrics, read_matrix_csv
from sefe_core.report import build_report

TASKS = ["01-scienceqa", "02-textvqa", "03-imagenet"]
PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(
    run_dir: Path,
    method: str,
    forget: dict[tuple[int, int], int],
    stages: int = 3,
    n: int = 4,
    keep_format: bool = False,
) -> None:
    """Predictions of `method`: every sample right at its own stage; forget[(stage, task)] of them
    wrong later, the first of which is still right in content (superficial). `keep_format`: the
    lost ones keep the format and lose the content instead (all essential, format kept)."""
    for k in range(1, stages + 1):
        recs = []
        for j in range(k):
            lost = forget.get((k, j), 0)
            for i in range(n):
                right = i >= lost
                recs.append(
                    PredictionRecord(
                        method,
                        k,
                        TASKS[j],
                        f"{TASKS[j]}-{i}",
                        "short",
                        "p",
                        "r",
                        float(right),
                        right or keep_format,
                        right or (i == 0 and not keep_format),
                        float(right),
                    )
                )
        write_predictions(recs, predictions_path(run_dir, method, TASKS[k - 1]))


def _table(md: str, heading: str) -> dict[str, list[str]]:
    """The first markdown table after `heading`: method -> cells."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = {}
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    fake_run(root, "lora", {(2, 0): 2, (3, 0): 3, (3, 1): 2})
    fake_run(root, "sefe", {(3, 0): 1})
    fake_run(root, "asd", {}, stages=1)  # a run that has only finished its first task
    build_report(root)
    return root


def test_report_files(run_dir: Path) -> None:
    out = run_dir / "report"
    for name in (
        "report.md",
        "metrics.json",
        "metrics.parquet",
        "metrics.png",
        "forgetting.png",
        "matrices.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for method in ("lora", "sefe", "asd"):
        rep = run_dir / method / "report"
        for name in (
            "report.md",
            "metrics.json",
            "accuracy.csv",
            "format.csv",
            "content.csv",
            "reference.csv",
        ):
            assert (rep / name).exists(), (method, name)
        for png in ("matrices.png", "forgetting.png"):
            assert (rep / png).read_bytes()[:8] == PNG
    assert not list(run_dir.rglob(".*tmp*")), "no temp files left behind"


def test_table_matches_metrics_json(run_dir: Path) -> None:
    md = (run_dir / "report" / "report.md").read_text()
    summary = json.loads((run_dir / "report" / "metrics.json").read_text())
    table = _table(md, "## Methods x metrics")
    assert list(table) == summary["order"] == ["lora", "asd", "sefe"]
    for method, cells in table.items():
        m = summary["methods"][method]
        expected = [m["metrics"]["accuracy"][k] for k in ("MFT", "MFN", "MAA", "BWT")]
        expected += [m["forgetting_mean"]["superficial"], m["forgetting_mean"]["essential"]]
        for cell, value in zip(cells, expected, strict=True):
            if value is None:
                assert cell == "n/a", (method, cell)
            else:
                assert float(cell) == pytest.approx(100 * value, abs=0.005), (method, cell)
    rows = METRIC_TABLE.read_records(run_dir / "report" / "metrics.parquet")
    assert len(rows) == 3 * 4 * 4
    for r in rows:
        assert summary["methods"][r.method]["metrics"][r.matrix][r.metric] == r.value


def test_numbers_by_hand(run_dir: Path) -> None:
    lora = json.loads((run_dir / "lora" / "report" / "metrics.json").read_text())
    # accuracy: diag 1, 1, 1; last row: task 1 lost 3/4, task 2 lost 2/4
    assert lora["metrics"]["accuracy"] == pytest.approx(
        {
            "MFT": 1.0,
            "MFN": (0.25 + 0.5 + 1) / 3,
            "MAA": (1 + (0.5 + 1) / 2 + (0.25 + 0.5 + 1) / 3) / 3,
            "BWT": (-0.75 - 0.5) / 2,
        }
    )
    t1, t2 = lora["forgetting"]["per_task"]
    assert (t1["task"], t1["lost"], t1["superficial"], t1["essential"]) == ("01-scienceqa", 0.75, 0.25, 0.5)
    assert t1["essential_format_lost"] == 0.5  # the fake wrong answers also fail the format
    assert (t2["superficial"], t2["essential"]) == (0.25, 0.25)
    assert lora["predictions"] == [f"lora/task-{t}/predictions.parquet" for t in TASKS]
    # the CSV the report wrote gives the same metrics through `sefe metrics`
    a, tasks = read_matrix_csv(run_dir / "lora" / "report" / "accuracy.csv")
    assert tasks == TASKS and cl_metrics(a) == pytest.approx(lora["metrics"]["accuracy"])
    asd = json.loads((run_dir / "asd" / "report" / "metrics.json").read_text())
    assert asd["stages"] == 1 and asd["metrics"]["accuracy"]["BWT"] is None
    md = (run_dir / "report" / "report.md").read_text()
    assert "In progress (fewer stages than the sequence): asd" in md
    assert re.search(r"\*\*superficial\*\* when the final answer is still right in content", md)


def test_sefe_report_cli(run_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    res = CliRunner().invoke(app, ["report", "--run-dir", str(copy), "-m", "sefe"])
    assert res.exit_code == 0, res.output
    assert "sefe" in res.output and "lora" not in res.output
    assert list(json.loads((copy / "report" / "metrics.json").read_text())["methods"]) == ["sefe"]
    empty = CliRunner().invoke(app, ["report", "--run-dir", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "no method" in empty.output


def test_the_report_for_the_ui_needs_no_files_beside_it(run_dir: Path) -> None:
    """A Prefect artifact resolves relative links against the UI's URL: plots go inline, links to
    files become absolute paths."""
    import base64

    from sefe_core.report import self_contained_markdown

    md = self_contained_markdown(run_dir / "report" / "report.md")
    images = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == PNG for i in images)
    assert "](" not in re.sub(r"\]\(data:image/png;base64,[A-Za-z0-9+/=]+\)", "", md)  # no other link
    for method in ("lora", "sefe", "asd"):
        assert f"{method}: `{(run_dir / method / 'report' / 'report.md').resolve()}`" in md


def test_loss_curves_from_train_records(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fake_run(root, "lora", {})
    for k, task in enumerate(TASKS):
        curve = [[s, 2.0 / (s + k)] for s in (10, 20, 30)]
        (root / "lora" / f"task-{task}" / "train.json").write_text(json.dumps({"loss_curve": curve}))
    fake_run(root, "sefe", {})  # no train records: no loss panel for it
    out = build_report(root)
    assert (out / "loss.png").read_bytes()[:8] == PNG and (root / "lora" / "report" / "loss.png").exists()
    assert not (root / "sefe" / "report" / "loss.png").exists()
    assert "## Training loss" in (out / "report.md").read_text()
    from sefe_core.analysis import analyse_method
    from sefe_core.report import loss_curves

    assert loss_curves(analyse_method(root, "lora"))["02-textvqa"] == [
        (10, 2 / 11),
        (20, 2 / 21),
        (30, 2 / 31),
    ]


def test_headline_rows_follow_the_run_order(run_dir: Path) -> None:
    from sefe_core.analysis import full_rows, headline_rows, metrics_summary

    summary = metrics_summary(run_dir / "report" / "metrics.json")
    rows = headline_rows(summary)
    assert [r["method"] for r in rows] == ["lora", "asd", "sefe"]
    lora = summary["methods"]["lora"]
    assert rows[0]["BWT"] == round(100 * lora["metrics"]["accuracy"]["BWT"], 2)
    assert rows[0]["essential forgetting"] == round(100 * lora["forgetting_mean"]["essential"], 2)
    full = full_rows(summary)
    assert [r["method"] for r in full] == ["lora", "asd", "sefe"]
    assert {"accuracy MFT", "format BWT", "content MFN", "forgetting superficial_share"} <= set(full[0])


def test_forgetting_figure_leaves_room_and_keeps_its_labels_apart(tmp_path: Path) -> None:
    """The tallest bar stays below the axis top (a zero-high stacked segment used to pin the axis
    to it), and the task names sit below the rotated method names instead of crossing them."""
    from sefe_core.analysis import analyse_method
    from sefe_core.report import _comparison_forgetting_figure

    # lora forgets all 4 samples of task 0 with the format kept: a bar of 100 points whose top
    # segment (format lost too) is empty, which pinned the axis at 100 before the fix
    fake_run(tmp_path, "lora", {(3, 0): 4, (3, 1): 2}, keep_format=True)
    fake_run(tmp_path, "reglora-random", {(3, 0): 1})
    fig = _comparison_forgetting_figure(
        [analyse_method(tmp_path, m, None) for m in ("lora", "reglora-random")]
    )
    right = fig.axes[1]
    tallest = max(p.get_y() + p.get_height() for p in right.patches)
    assert tallest == pytest.approx(100.0)
    assert right.get_ylim()[1] > tallest * 1.05
    renderer = fig.canvas.get_renderer()
    methods = [t for t in right.texts if t.get_text() in ("lora", "reglora-random")]
    assert len(methods) == 4  # one per method per forgotten-from task
    lowest_method = min(t.get_window_extent(renderer).y0 for t in methods)
    names = [t for t in right.get_xticklabels() if t.get_text()]
    assert names and all(t.get_window_extent(renderer).y1 <= lowest_method for t in names)
