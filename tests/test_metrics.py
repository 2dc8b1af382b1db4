"""MFT / MFN / MAA / BWT on hand-computed matrices, matrix files, and matrices from predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from data_contracts import PredictionRecord
from flows.cli import app
from sefe_core.metrics import (
    MatrixError,
    build_matrices,
    check_matrix,
    cl_metrics,
    forgetting_split,
    read_matrix_csv,
    write_matrix_csv,
)

N = None
A3 = [[0.9, N, N], [0.8, 0.85, N], [0.6, 0.7, 0.95]]


def test_metrics_by_hand() -> None:
    m = cl_metrics(A3)
    assert m["MFT"] == pytest.approx((0.9 + 0.85 + 0.95) / 3)
    assert m["MFN"] == pytest.approx((0.6 + 0.7 + 0.95) / 3)
    assert m["MAA"] == pytest.approx((0.9 + (0.8 + 0.85) / 2 + (0.6 + 0.7 + 0.95) / 3) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.85)) / 2)
    assert list(m) == ["MFT", "MFN", "MAA", "BWT"]


def test_single_task() -> None:
    assert cl_metrics([[0.7]]) == {"MFT": 0.7, "MFN": 0.7, "MAA": 0.7, "BWT": None}


@pytest.mark.parametrize(
    "matrix, message",
    [
        (
            [[0.9, N, N], [0.8, 0.85, N]],
            r"not square: 2 stage rows x 3 task columns.*stage\(s\) \[3\] missing",
        ),
        ([[0.9, N], [0.8, 0.85], [0.6, 0.7]], "not square: 3 stage rows x 2"),
        ([[0.9, N, N], [N, 0.85, N], [0.6, 0.7, 0.95]], r"stage 2 \(b\) has no value for task 1 \(a\)"),
        (
            [[0.9, 0.1, N], [0.8, 0.85, N], [0.6, 0.7, 0.95]],
            r"stage 1 \(a\) has a value \(0.1\) for task 2 \(b\)",
        ),
    ],
    ids=["missing-stage", "non-square", "blank-below-diagonal", "value-above-diagonal"],
)
def test_bad_matrices(matrix, message: str) -> None:
    with pytest.raises(MatrixError, match=message):
        check_matrix(matrix, tasks=["a", "b", "c"][: len(matrix[0])])


def test_matrix_csv_round_trip_and_formats(tmp_path: Path) -> None:
    a = check_matrix(A3)
    path = write_matrix_csv(tmp_path / "acc.csv", a, ["t1", "t2", "t3"])
    assert path.read_text().splitlines()[:2] == ["stage,t1,t2,t3", "t1,0.9,,"]
    back, tasks = read_matrix_csv(path)
    assert tasks == ["t1", "t2", "t3"] and np.array_equal(np.isnan(back), np.isnan(a))
    assert np.allclose(np.nan_to_num(back), np.nan_to_num(a))
    bare = tmp_path / "bare.csv"
    bare.write_text("90\n80,85\n60,70,95\n")  # no header, no labels, percentages
    assert cl_metrics(read_matrix_csv(bare)[0])["BWT"] == pytest.approx(-22.5)

    numbered = tmp_path / "numbered.csv"
    numbered.write_text("stage,a,b,c\n1,0.9,,\n2,0.8,0.85,\n4,0.6,0.7,0.95\n")
    with pytest.raises(MatrixError, match=r"stage\(s\) \[3\] missing"):
        read_matrix_csv(numbered)
    short = tmp_path / "short.csv"
    short.write_text("stage,a,b,c\na,0.9,,\nb,0.8,0.85,\n")
    with pytest.raises(MatrixError, match=r"missing"):
        read_matrix_csv(short)
    word = tmp_path / "word.csv"
    word.write_text("0.9,,\n0.8,high,\n0.6,0.7,0.95\n")
    with pytest.raises(MatrixError, match="'high' is not a finite number"):
        read_matrix_csv(word)
    with pytest.raises(FileNotFoundError, match="no such matrix file"):
        read_matrix_csv(tmp_path / "nope.csv")


def test_sefe_metrics_cli(tmp_path: Path) -> None:
    path = write_matrix_csv(tmp_path / "acc.csv", check_matrix(A3), ["t1", "t2", "t3"])
    res = CliRunner().invoke(app, ["metrics", str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["tasks"] == 3
    assert {k: out[k] for k in ("MFT", "MFN", "MAA", "BWT")} == pytest.approx(cl_metrics(A3))
    human = CliRunner().invoke(app, ["metrics", str(path)])
    assert human.exit_code == 0 and "-0.2250" in human.output
    bad = tmp_path / "bad.csv"
    bad.write_text("stage,a,b\na,0.9,\n")
    res = CliRunner().invoke(app, ["metrics", str(bad)])
    assert res.exit_code == 2 and "missing" in res.output


def pred(
    stage: int,
    task: str,
    i: int,
    score: float,
    content: bool | None = None,
    method: str = "m",
    fmt: bool | None = None,
):
    ok = score == 1.0
    return PredictionRecord(
        method,
        stage,
        task,
        f"{task}-{i}",
        "short",
        "p",
        "r",
        score,
        ok if fmt is None else fmt,
        ok if content is None else content,
        score,
    )


def test_matrices_and_forgetting_from_predictions() -> None:
    # task a: 4 samples; right after learning it [1, 1, 1, 0]; at stage 2 [0, 0, 1, 1], where the
    # first lost answer is still right in content (superficial) and the second is not (essential,
    # but still in the task's format)
    preds = [pred(1, "a", i, s) for i, s in enumerate([1, 1, 1, 0])]
    final = zip([0, 0, 1, 1], [True, False, True, True], [False, True, True, True], strict=True)
    preds += [pred(2, "a", i, s, c, fmt=f) for i, (s, c, f) in enumerate(final)]
    preds += [pred(2, "b", i, s) for i, s in enumerate([1, 0.5, 1, 1])]
    mats = build_matrices(preds)
    assert mats.tasks == ("a", "b") and mats.complete and mats.counts.tolist() == [[4, 0], [4, 4]]
    acc = mats.values["accuracy"]
    assert acc[0, 0] == 0.75 and acc[1, 0] == 0.5 and acc[1, 1] == 0.875 and np.isnan(acc[0, 1])
    assert mats.values["content"][1, 0] == 0.75
    assert mats.metrics()["accuracy"]["BWT"] == pytest.approx(-0.25)
    [row] = forgetting_split(preds, mats)
    assert (row.task, row.drop, row.lost, row.gained) == ("a", 0.25, 0.5, 0.25)
    assert (row.superficial, row.essential, row.superficial_share) == (0.25, 0.25, 0.5)
    assert row.essential_format_lost == 0.0
    assert mats.values["format"][1, 0] == 0.75

    partial = build_matrices(preds[:4], tasks=["a", "b"])  # a run still at stage 1 of 2
    assert not partial.complete and partial.metrics()["accuracy"]["BWT"] is None


def test_prediction_matrix_errors() -> None:
    base = [pred(1, "a", 0, 1), pred(2, "a", 0, 1), pred(2, "b", 0, 1)]
    with pytest.raises(MatrixError, match="no predictions of stage 2 .* on task a"):
        build_matrices(
            [base[0], base[2], pred(3, "a", 0, 1), pred(3, "b", 0, 1), pred(3, "c", 0, 1)],
            tasks=["a", "b", "c"],
        )
    with pytest.raises(MatrixError, match="stage 1 on task b, which is only learned at stage 2"):
        build_matrices([*base, pred(1, "b", 0, 1)], tasks=["a", "b"])
    with pytest.raises(MatrixError, match="cannot infer the task order"):
        build_matrices([pred(2, "a", 0, 1), pred(2, "b", 0, 1)])
    with pytest.raises(MatrixError, match="one method"):
        build_matrices([*base, pred(1, "a", 0, 1, method="other")])
