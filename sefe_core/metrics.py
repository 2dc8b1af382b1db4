"""Continual-learning metrics (docs/design.md §1.4) and the forgetting split (§1.5).

An accuracy matrix ``a`` is T x T: row i is the stage after task i, column j is task j, and only
cells with j <= i exist (task j is not evaluated before it has been learned). From it:

* MFT = mean_j a[j][j]                       (mean fine-tune accuracy: each task just after learning it)
* MFN = mean_j a[T][j]                       (mean final accuracy)
* MAA = mean_i ( mean_{j<=i} a[i][j] )       (mean average accuracy over the whole sequence)
* BWT = mean_{j<T} ( a[T][j] - a[j][j] )     (backward transfer; undefined, None, when T = 1)

The same four metrics are computed on the format matrix (share of answers in the task's native
format) and the content matrix (share right once the format is ignored), and on the accuracy
matrix under the reference evaluators' rules. Matrices hold fractions in [0, 1]; blank cells are NaN.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts import METRICS, PredictionRecord, atomic_path

# Matrix name -> the predictions column it averages.
MATRIX_COLUMNS: dict[str, str] = {
    "accuracy": "score",
    "format": "format_ok",
    "content": "content_ok",
    "reference": "score_reference",
}


class MatrixError(ValueError):
    """A matrix (file or predictions) cannot give the metrics; says which stage/task is wrong."""


# --------------------------------------------------------------------------------------------
# Matrix checks and the four metrics
# --------------------------------------------------------------------------------------------
def _label(tasks: Sequence[str] | None, i: int) -> str:
    return f"stage {i + 1}" + (f" ({tasks[i]})" if tasks is not None and i < len(tasks) else "")


def check_matrix(
    a: np.ndarray | Sequence[Sequence[float | None]],
    tasks: Sequence[str] | None = None,
    source: str = "matrix",
) -> np.ndarray:
    """Return `a` as a float array after checking it is square, complete on and below the diagonal,
    and blank above it. Errors name the stage and task."""
    arr = (
        np.array([[np.nan if v is None else v for v in row] for row in a], dtype=float)
        if not isinstance(a, np.ndarray)
        else a.astype(float)
    )
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise MatrixError(f"{source}: expected a non-empty 2-D matrix, got shape {arr.shape}")
    rows, cols = arr.shape
    if rows != cols:
        raise MatrixError(
            f"{source}: not square: {rows} stage rows x {cols} task columns (row i = stage after task i, "
            f"column j = task j)"
            + (f"; stage(s) {list(range(rows + 1, cols + 1))} missing" if rows < cols else "")
        )
    if tasks is not None and len(tasks) != cols:
        raise MatrixError(f"{source}: {cols} columns but {len(tasks)} task names")
    for i in range(rows):
        for j in range(cols):
            v = arr[i, j]
            if j <= i and math.isnan(v):
                raise MatrixError(
                    f"{source}: {_label(tasks, i)} has no value for task {j + 1}"
                    + (f" ({tasks[j]})" if tasks is not None else "")
                    + ": a missing stage or evaluation (cells at and below the diagonal must be filled)"
                )
            if j > i and not math.isnan(v):
                raise MatrixError(
                    f"{source}: {_label(tasks, i)} has a value ({v:g}) for task {j + 1}"
                    + (f" ({tasks[j]})" if tasks is not None else "")
                    + ", above the diagonal: that task is not learned yet at this stage; leave it blank"
                )
    return arr


def cl_metrics(
    a: np.ndarray | Sequence[Sequence[float | None]], tasks: Sequence[str] | None = None
) -> dict[str, float | None]:
    """MFT, MFN, MAA, BWT of a checked accuracy matrix (BWT is None for a single task)."""
    arr = check_matrix(a, tasks)
    t = arr.shape[0]
    diag = np.diag(arr)
    last = arr[t - 1]
    out: dict[str, float | None] = {
        "MFT": float(diag.mean()),
        "MFN": float(last.mean()),
        "MAA": float(np.mean([arr[i, : i + 1].mean() for i in range(t)])),
        "BWT": float((last[: t - 1] - diag[: t - 1]).mean()) if t > 1 else None,
    }
    assert tuple(out) == METRICS
    return out


# --------------------------------------------------------------------------------------------
# Matrix CSV: header "stage,<task 1>,...,<task T>", then one row per stage, blank above the diagonal
# --------------------------------------------------------------------------------------------
def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def matrix_to_csv(a: np.ndarray, tasks: Sequence[str] | None = None) -> str:
    t = a.shape[0]
    tasks = list(tasks) if tasks is not None else [str(j + 1) for j in range(t)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stage", *tasks])
    for i in range(t):
        w.writerow([tasks[i], *("" if math.isnan(v) else format(float(v), ".10g") for v in a[i])])
    return buf.getvalue()


def write_matrix_csv(path: str | Path, a: np.ndarray, tasks: Sequence[str] | None = None) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(matrix_to_csv(a, tasks))
    return path


def read_matrix_csv(path: str | Path) -> tuple[np.ndarray, list[str] | None]:
    """Read a matrix CSV (as `write_matrix_csv` writes, or bare numbers) and check it.

    An optional header row names the tasks; an optional first column labels the stages (task
    names, or stage numbers 1..T, in which case a gap is reported as a missing stage).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such matrix file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MatrixError(
            f"{path}: not UTF-8 text (byte {e.start}): a matrix file is a CSV of numbers"
        ) from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise MatrixError(f"{path}: empty matrix file")
    header: list[str] | None = None
    if any(c.strip() and not _is_number(c) for c in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if not rows:
        raise MatrixError(f"{path}: a header but no stage rows")
    labelled = (header is not None and header[0].lower() in ("stage", "", "after", "after task")) or all(
        r[0].strip() and not _is_number(r[0]) for r in rows
    )
    labels = [r[0].strip() for r in rows] if labelled else None
    body = [r[1:] if labelled else r for r in rows]
    tasks = (header[1:] if labelled else header) if header is not None else None
    width = len(tasks) if tasks is not None else max(len(r) for r in body)
    stage_numbers = labels is not None and all(lbl.isdigit() for lbl in labels)
    if stage_numbers:
        nums = [int(lbl) for lbl in labels]
        if nums != list(range(1, len(nums) + 1)):
            missing = [k for k in range(1, max(nums) + 1) if k not in nums]
            raise MatrixError(
                f"{path}: stage rows are labelled {nums}; expected 1..{width} in order"
                + (f": stage(s) {missing} missing" if missing else "")
            )
    values = np.full((len(body), width), np.nan)
    for i, r in enumerate(body):
        if len(r) > width and any(c.strip() for c in r[width:]):
            raise MatrixError(f"{path}: row {i + 1} has {len(r)} values but there are {width} task columns")
        for j, c in enumerate(r[:width]):
            c = c.strip()
            if not c:
                continue
            if not _is_number(c) or not math.isfinite(float(c)):
                raise MatrixError(f"{path}: row {i + 1}, column {j + 1}: {c!r} is not a finite number")
            values[i, j] = float(c)
    _check_scale(values, path)
    return check_matrix(values, tasks, source=str(path)), tasks


def _check_scale(values: np.ndarray, path: Path) -> None:
    """Accuracies are fractions (all cells <= 1) or percentages; either way none below 0 or
    above the scale's top (a cell of 270 is a typo, not an accuracy)."""
    cells = values[~np.isnan(values)]
    if not cells.size:
        return
    scale, top = ("fractions", 1.0) if cells.max() <= 1 else ("percentages", 100.0)
    bad = cells[(cells < 0) | (cells > top)]
    if bad.size:
        raise MatrixError(
            f"{path}: {bad[0]:g} is not an accuracy: the file reads as {scale} (largest cell {cells.max():g}), "
            f"so every cell must be in [0, {top:g}]"
        )


# --------------------------------------------------------------------------------------------
# Matrices from predictions
# --------------------------------------------------------------------------------------------
def predictions_frame(predictions: Iterable[PredictionRecord] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(predictions, pd.DataFrame):
        return predictions
    df = pd.DataFrame([p.__dict__ for p in predictions])
    if df.empty:
        raise MatrixError("no predictions")
    return df


def task_order(df: pd.DataFrame) -> list[str]:
    """The task sequence implied by the predictions: task k is first evaluated at stage k."""
    first = df[df["stage"] >= 1].groupby("task")["stage"].min().sort_values()
    stages = first.tolist()
    if stages != list(range(1, len(stages) + 1)):
        raise MatrixError(
            "cannot infer the task order: each task must be first evaluated at its own stage, got "
            + ", ".join(f"{t} first at stage {s}" for t, s in first.items())
        )
    return first.index.tolist()


@dataclass(frozen=True)
class Matrices:
    """The matrices of one method: `values[name]` is T x T (NaN above the diagonal)."""

    method: str
    tasks: tuple[str, ...]
    values: dict[str, np.ndarray]
    counts: np.ndarray  # samples per cell
    complete: bool  # every task of the requested sequence has its stage

    def metrics(self) -> dict[str, dict[str, float | None]]:
        return {name: cl_metrics(a, self.tasks) for name, a in self.values.items()}


def build_matrices(
    predictions: Iterable[PredictionRecord] | pd.DataFrame,
    method: str | None = None,
    tasks: Sequence[str] | None = None,
) -> Matrices:
    """Average each (stage, task) cell of the predictions into the four matrices.

    `tasks` is the task sequence (default: inferred). A run still in progress (k of T stages)
    gives k x k matrices with `complete=False`; a stage missing in between is an error. Stage 0
    (the base model, if evaluated) is not part of the matrices.
    """
    df = predictions_frame(predictions)
    if method is not None:
        df = df[df["method"] == method]
    methods = sorted(df["method"].unique())
    if len(methods) != 1:
        raise MatrixError(f"expected the predictions of one method, got {methods or 'none'}")
    df = df[df["stage"] >= 1]
    if df.empty:
        raise MatrixError(f"method {methods[0]}: no predictions of a trained stage (stage >= 1)")
    seq = list(tasks) if tasks is not None else task_order(df)
    unknown = sorted(set(df["task"]) - set(seq))
    if unknown:
        raise MatrixError(f"method {methods[0]}: predictions for task(s) {unknown} not in the sequence {seq}")
    t = int(df["stage"].max())
    if t > len(seq):
        raise MatrixError(f"method {methods[0]}: stage {t} but the sequence has {len(seq)} tasks")
    cells = df.groupby(["stage", "task"])
    means = {name: cells[col].mean() for name, col in MATRIX_COLUMNS.items() if col in df}
    if "score_reference" in df and df["score_reference"].isna().any():
        means.pop("reference")  # hand-made predictions without the reference score
    sizes = cells.size()
    counts = np.zeros((t, t), dtype=int)
    values = {name: np.full((t, t), np.nan) for name in means}
    for i in range(t):
        for j in range(t):
            key = (i + 1, seq[j])
            if j > i:
                if key in sizes.index:
                    raise MatrixError(
                        f"method {methods[0]}: predictions of stage {i + 1} on task {seq[j]}, which is only "
                        f"learned at stage {j + 1} (above the diagonal)"
                    )
                continue
            if key not in sizes.index:
                raise MatrixError(
                    f"method {methods[0]}: no predictions of stage {i + 1} (after {seq[i]}) on task {seq[j]}: "
                    "a missing stage, or its evaluation did not finish"
                )
            counts[i, j] = sizes[key]
            for name, m in means.items():
                values[name][i, j] = float(m[key])
    for name, a in values.items():
        check_matrix(a, seq[:t], source=f"method {methods[0]}, {name} matrix")
    return Matrices(methods[0], tuple(seq[:t]), values, counts, complete=t == len(seq))


# --------------------------------------------------------------------------------------------
# Forgetting split
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForgettingRow:
    """How task j's score changed from its own stage (a[j][j]) to the last stage (a[T][j]).

    Per sample s, loss(s) = max(0, score_j(s) - score_T(s)) and gain(s) = max(0, score_T(s) -
    score_j(s)); `lost` and `gained` are their means over the task's samples, so
    drop = a[j][j] - a[T][j] = lost - gained. The loss splits by the final answer:
    `superficial` = loss of answers whose content is still right (content_ok at stage T) but
    which fail the scorer (format), `essential` = loss of answers whose content is wrong.
    `essential_format_lost` is the part of `essential` whose final answer has lost the task's
    format too (e.g. a class name given to a multiple-choice question): there the format drifted
    as well, and the content check cannot tell whether the knowledge would still be there.
    """

    task: str
    learned: float
    final: float
    drop: float
    lost: float
    gained: float
    superficial: float
    essential: float
    essential_format_lost: float

    @property
    def superficial_share(self) -> float | None:
        return self.superficial / self.lost if self.lost > 0 else None


def forgetting_split(
    predictions: Iterable[PredictionRecord] | pd.DataFrame, matrices: Matrices
) -> list[ForgettingRow]:
    """One row per task learned before the last stage (none when there is a single stage)."""
    df = predictions_frame(predictions)
    df = df[df["method"] == matrices.method]
    t = len(matrices.tasks)
    rows = []
    for j, task in enumerate(matrices.tasks[: t - 1]):
        own = df[(df["task"] == task) & (df["stage"] == j + 1)].set_index("id")
        last = df[(df["task"] == task) & (df["stage"] == t)].set_index("id")
        if set(own.index) != set(last.index):
            raise MatrixError(
                f"method {matrices.method}, task {task}: stage {j + 1} and stage {t} were evaluated on "
                "different samples; the split needs the same samples"
            )
        last = last.loc[own.index]
        diff = own["score"].to_numpy(float) - last["score"].to_numpy(float)
        loss = np.clip(diff, 0, None)
        content = last["content_ok"].to_numpy(bool)
        fmt = last["format_ok"].to_numpy(bool)
        rows.append(
            ForgettingRow(
                task=task,
                learned=float(own["score"].mean()),
                final=float(last["score"].mean()),
                drop=float(diff.mean()),
                lost=float(loss.mean()),
                gained=float(np.clip(-diff, 0, None).mean()),
                superficial=float((loss * content).mean()),
                essential=float((loss * ~content).mean()),
                essential_format_lost=float((loss * (~content & ~fmt)).mean()),
            )
        )
    return rows
