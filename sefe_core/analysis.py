"""What a run's report says, computed from the methods' predictions (no plotting): per method its
accuracy / format / content matrices, the CoIN metrics and the forgetting split; across methods
the metric records. `report.py` renders it (markdown, PNG, CSV)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_contracts import MetricRecord
from sefe_core.evaluate import PREDICTIONS_FILE, method_predictions
from sefe_core.metrics import ForgettingRow, Matrices, build_matrices, forgetting_split

REPORT_DIR = "report"


def _json_matrix(a: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in a]


def ordered_methods(methods: Sequence[str]) -> list[str]:
    """In the order a reader compares them (the registry's, docs/design.md §1.3)."""
    from sefe_core.methods import ordered

    return ordered(methods)


@dataclass(frozen=True)
class MethodReport:
    method: str
    matrices: Matrices
    metrics: dict[str, dict[str, float | None]]
    forgetting: list[ForgettingRow]
    forgetting_mean: dict[str, float | None]
    prediction_files: list[str]
    dir: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tasks": list(self.matrices.tasks),
            "stages": len(self.matrices.tasks),
            "complete": self.matrices.complete,
            "samples_per_cell": self.matrices.counts.tolist(),
            "matrices": {k: _json_matrix(v) for k, v in self.matrices.values.items()},
            "metrics": self.metrics,
            "forgetting": {
                "per_task": [asdict(r) | {"superficial_share": r.superficial_share} for r in self.forgetting],
                "mean": self.forgetting_mean,
            },
            "predictions": self.prediction_files,
        }


def _forgetting_mean(rows: list[ForgettingRow]) -> dict[str, float | None]:
    keys = ("drop", "lost", "gained", "superficial", "essential", "essential_format_lost")
    if not rows:
        return {k: None for k in (*keys, "superficial_share")}
    out: dict[str, float | None] = {k: float(np.mean([getattr(r, k) for r in rows])) for k in keys}
    lost = sum(r.lost for r in rows)
    out["superficial_share"] = sum(r.superficial for r in rows) / lost if lost > 0 else None
    return out


def analyse_method(run_dir: str | Path, method: str, tasks: Sequence[str] | None = None) -> MethodReport:
    """Matrices, metrics and forgetting split of one method, from its predictions files."""
    run_dir = Path(run_dir)
    df = method_predictions(run_dir, method)
    mats = build_matrices(df, method, tasks)
    rows = forgetting_split(df, mats)
    files = sorted(str(p.relative_to(run_dir)) for p in (run_dir / method).glob(f"task-*/{PREDICTIONS_FILE}"))
    return MethodReport(
        method, mats, mats.metrics(), rows, _forgetting_mean(rows), files, run_dir / method / REPORT_DIR
    )


def metric_records(reports: Sequence[MethodReport]) -> list[MetricRecord]:
    return [
        MetricRecord(rep.method, matrix, metric, value)
        for rep in reports
        for matrix, values in rep.metrics.items()
        for metric, value in values.items()
    ]


def metrics_summary(path: str | Path) -> dict[str, Any]:
    """Read a comparison metrics.json back (for the CLI and tests)."""
    return json.loads(Path(path).read_text())


HEADLINE = ("MFT", "MFN", "MAA", "BWT")


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 2)


def headline_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method in run order: stages, the accuracy metrics and the forgetting split, in
    percent (what a reader compares first: the CLI table and the UI's compact artifact)."""
    rows = []
    for name in summary["order"]:
        m = summary["methods"][name]
        acc, fg = m["metrics"]["accuracy"], m["forgetting_mean"]
        rows.append(
            {
                "method": name,
                "stages": m["stages"],
                **{k: _pct(acc[k]) for k in HEADLINE},
                "superficial forgetting": _pct(fg["superficial"]),
                "essential forgetting": _pct(fg["essential"]),
            }
        )
    return rows


def full_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every metric of every matrix (accuracy, format, content) and every forgetting figure, one
    row per method in run order, in percent."""
    rows = []
    for name in summary["order"]:
        m = summary["methods"][name]
        row: dict[str, Any] = {"method": name}
        for matrix, values in m["metrics"].items():
            row.update({f"{matrix} {metric}": _pct(v) for metric, v in values.items()})
        row.update({f"forgetting {part}": _pct(v) for part, v in m["forgetting_mean"].items()})
        rows.append(row)
    return rows
