"""Run report: matrices, metrics and the superficial / essential forgetting split (computed by
`analysis.py`), rendered as markdown, PNG plots (matplotlib, Agg), CSV matrices, metrics.json and
a metrics Parquet table.

Per method: `<run_dir>/<method>/report/` (its matrices, metrics, per-task forgetting).
Comparison: `<run_dir>/report/` (methods x metrics table, metrics side by side, forgetting split per
task and method, one accuracy heatmap per method). Every file is written atomically, and every
number is computed from the methods' `predictions.parquet` files, which the report lists.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from data_contracts import METRIC_TABLE, METRICS, atomic_path, write_json  # noqa: E402
from sefe_core.analysis import REPORT_DIR, MethodReport, analyse_method, metric_records, ordered_methods  # noqa: E402
from sefe_core.evaluate import PREDICTIONS_FILE, run_methods  # noqa: E402
from sefe_core.metrics import write_matrix_csv  # noqa: E402

MATRIX_TITLES = {
    "accuracy": "Accuracy (intended scorer rules)",
    "content": "Content right (format ignored)",
    "format": "Native answer format",
    "reference": "Accuracy (reference evaluators' rules)",
}
SUPERFICIAL_COLOR, ESSENTIAL_COLOR = "#f4a259", "#8c2d19"

DEFINITIONS = """\
**How to read the forgetting split.** For every task j learned before the last stage T, the
*drop* is a[j][j] - a[T][j]: its accuracy right after learning it minus its accuracy at the end.
Per test sample, the score it lost between stage j and stage T (max(0, score_j - score_T)) is
counted as

* **superficial** when the final answer is still right in content (`content_ok`: the option
  letter or text, the short answer, or the box is found anywhere in the answer) but fails the
  scorer, i.e. the knowledge is there and the answer format has drifted;
* **essential** when the final answer is wrong in content: the knowledge itself is gone. Its
  part *format lost too* is where the final answer has also left the task's format (e.g. a class
  name given to a multiple-choice question): there the style drifted as well, and the content
  check alone cannot tell whether the knowledge would still be found in the right format.

superficial + essential = *lost*; drop = lost - *gained* (samples that got better later).
All numbers are percentages of the task's test samples (percentage points for drops and BWT).
"""


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def save_png(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def task_labels(tasks: Sequence[str]) -> list[str]:
    """Axis labels: the kind alone (`scienceqa`), or the full names where a kind comes back (a
    sequence of several rounds: `01-scienceqa`, `09-scienceqa`)."""
    short = [name.split("-", 1)[-1] for name in tasks]
    return short if len(set(short)) == len(short) else list(tasks)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# One method
# --------------------------------------------------------------------------------------------


def _heatmap(ax: plt.Axes, a: np.ndarray, tasks: Sequence[str], title: str, ylabels: bool = True) -> Any:
    t = len(tasks)
    shown = np.ma.masked_invalid(100 * a)
    im = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis")
    short = task_labels(tasks)
    ax.set_xticks(range(t), short, rotation=45, ha="right", fontsize=9)
    ax.set_xlabel("evaluated task j")
    if ylabels:
        numbered = short if short == list(tasks) else [f"{i + 1}. {s}" for i, s in enumerate(short)]
        ax.set_yticks(range(t), numbered, fontsize=9)
        ax.set_ylabel("stage i (after training task i)")
    else:
        ax.set_yticks(range(t), [""] * t)
    ax.set_title(title, fontsize=11)
    for i in range(t):
        for j in range(i + 1):
            v = 100 * a[i, j]
            ax.text(
                j,
                i,
                f"{v:.0f}",
                ha="center",
                va="center",
                fontsize=8 if t > 6 else 10,
                color="black" if v > 55 else "white",
            )
    return im


def _matrices_figure(rep: MethodReport) -> Figure:
    names = [n for n in ("accuracy", "format", "content") if n in rep.matrices.values]
    t = len(rep.matrices.tasks)
    side = max(3.2, 0.5 * t + 1.2)
    fig, axes = plt.subplots(
        1, len(names), figsize=(side * len(names) + 1.5, side + 1.2), squeeze=False, layout="constrained"
    )
    im = None
    for k, (ax, name) in enumerate(zip(axes[0], names, strict=True)):
        im = _heatmap(ax, rep.matrices.values[name], rep.matrices.tasks, MATRIX_TITLES[name], ylabels=k == 0)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="% of test samples")
    fig.suptitle(f"{rep.method}: a[i][j] after each stage", fontsize=13)
    return fig


ESSENTIAL_FORMAT_LOST_COLOR = "#c96a55"
SPLIT_LABELS = (
    "superficial (content right, format wrong)",
    "essential, format kept (content wrong)",
    "essential, format lost too (content and format wrong)",
)


def _split_bars(
    ax: plt.Axes, x: np.ndarray, parts: Sequence[dict[str, Any]] | Sequence[Any], width: float, label: bool
) -> None:
    """Stacked bars: superficial, essential with the format kept, essential with it lost too."""

    def get(p: Any, key: str) -> float:
        return 100 * (p[key] if isinstance(p, dict) else getattr(p, key))

    sup = np.array([get(p, "superficial") for p in parts])
    lost_fmt = np.array([get(p, "essential_format_lost") for p in parts])
    kept = np.array([get(p, "essential") for p in parts]) - lost_fmt
    labels = SPLIT_LABELS if label else (None, None, None)
    ax.bar(x, sup, width, color=SUPERFICIAL_COLOR, label=labels[0])
    ax.bar(x, kept, width, bottom=sup, color=ESSENTIAL_COLOR, label=labels[1])
    ax.bar(
        x,
        lost_fmt,
        width,
        bottom=sup + kept,
        color=ESSENTIAL_FORMAT_LOST_COLOR,
        hatch="//",
        edgecolor="white",
        linewidth=0,
        label=labels[2],
    )


def _headroom(ax: plt.Axes) -> None:
    """Room above the tallest bar or marker. A stacked bar's base is a "sticky" edge that
    autoscaling never pads past, so an empty top segment (height 0) pinned the axis to the tallest
    bar's top."""
    ax.set_ylim(top=max(float(ax.dataLim.y1) * 1.08, 1.0))


def _forgetting_figure(rep: MethodReport) -> Figure:
    rows = rep.forgetting
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
    if not rows:
        ax.text(
            0.5,
            0.5,
            "a single stage: nothing to forget yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return fig
    x = np.arange(len(rows))
    _split_bars(ax, x, rows, 0.6, label=True)
    ax.scatter(
        x,
        [100 * r.drop for r in rows],
        color="black",
        marker="D",
        zorder=3,
        label="net drop a[j][j] - a[T][j]",
    )
    ax.axhline(0, color="grey", lw=0.8)
    _headroom(ax)
    ax.set_xticks(x, task_labels([r.task for r in rows]), rotation=30, ha="right")
    ax.set_ylabel("percentage points of the task's samples")
    ax.set_title(f"{rep.method}: forgetting from stage j to stage {len(rep.matrices.tasks)}, per task j")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _metric_rows(rep: MethodReport) -> list[list[str]]:
    return [
        [MATRIX_TITLES[name], *(_pct(rep.metrics[name][m], signed=m == "BWT") for m in METRICS)]
        for name in ("accuracy", "content", "format", "reference")
        if name in rep.metrics
    ]


def _matrix_md(a: np.ndarray, tasks: Sequence[str]) -> str:
    rows = [
        [f"{i + 1}. {tasks[i]}", *("" if np.isnan(v) else _pct(v) for v in a[i])] for i in range(len(tasks))
    ]
    return md_table(["stage \\ task", *tasks], rows)


def _method_markdown(rep: MethodReport, loss_plot: bool = False) -> str:
    t = len(rep.matrices.tasks)
    status = "complete" if rep.matrices.complete else f"in progress: {t} stage(s) so far"
    parts = [
        f"# Method `{rep.method}`\n",
        f"{t} stage(s) ({status}); test samples per cell: "
        f"{int(rep.matrices.counts[np.tril_indices(t)].min())}-{int(rep.matrices.counts.max())}.\n",
        "## Metrics\n",
        "MFT = mean_j a[j][j], MFN = mean_j a[T][j], MAA = mean_i mean_{j<=i} a[i][j], "
        "BWT = mean_{j<T} (a[T][j] - a[j][j]); in %.\n",
        md_table(["matrix", *METRICS], _metric_rows(rep)),
        "## Accuracy matrix (row i = stage after task i, column j = task j)\n",
        _matrix_md(rep.matrices.values["accuracy"], rep.matrices.tasks),
        "![accuracy, format and content matrices](matrices.png)\n",
        "## Forgetting: superficial vs essential\n",
        DEFINITIONS,
    ]
    if rep.forgetting:
        rows = [
            [
                r.task,
                _pct(r.learned),
                _pct(r.final),
                _pct(r.drop, True),
                _pct(r.lost),
                _pct(r.gained),
                _pct(r.superficial),
                _pct(r.essential),
                _pct(r.essential_format_lost),
                "n/a" if r.superficial_share is None else f"{100 * r.superficial_share:.0f}%",
            ]
            for r in rep.forgetting
        ]
        m = rep.forgetting_mean
        share = m["superficial_share"]
        rows.append(
            [
                "**mean**",
                "",
                "",
                _pct(m["drop"], True),
                _pct(m["lost"]),
                _pct(m["gained"]),
                _pct(m["superficial"]),
                _pct(m["essential"]),
                _pct(m["essential_format_lost"]),
                "n/a" if share is None else f"{100 * share:.0f}%",
            ]
        )
        parts.append(
            md_table(
                [
                    "task j",
                    "a[j][j]",
                    "a[T][j]",
                    "drop",
                    "lost",
                    "gained",
                    "superficial",
                    "essential",
                    "(format lost too)",
                    "superficial share",
                ],
                rows,
            )
        )
        parts.append("![superficial vs essential forgetting per task](forgetting.png)\n")
    else:
        parts.append("A single stage: nothing to forget yet.\n")
    if loss_plot:
        parts.append("## Training loss\n\n![training loss per task](loss.png)\n")
    parts.append(
        "## Sources\n\nEvery number above is an average over these prediction files "
        "(one row per stage, evaluated task and sample):\n"
    )
    parts.append("".join(f"- `{f}`\n" for f in rep.prediction_files))
    return "\n".join(p if p.endswith("\n") else p + "\n" for p in parts)


def write_method_report(rep: MethodReport) -> Path:
    """Write `<run_dir>/<method>/report/`: report.md, metrics.json, <matrix>.csv, PNGs."""
    out = rep.dir
    out.mkdir(parents=True, exist_ok=True)
    for name, a in rep.matrices.values.items():
        write_matrix_csv(out / f"{name}.csv", a, rep.matrices.tasks)
    write_json(out / "metrics.json", rep.to_json())
    save_png(_matrices_figure(rep), out / "matrices.png")
    save_png(_forgetting_figure(rep), out / "forgetting.png")
    _write_text(out / "report.md", _method_markdown(rep, _save_loss_figure([rep], out / "loss.png")))
    return out


# --------------------------------------------------------------------------------------------
# Comparison of methods
# --------------------------------------------------------------------------------------------


def _metrics_figure(reports: Sequence[MethodReport]) -> Figure:
    names = [n for n in ("accuracy", "content", "format") if all(n in r.metrics for r in reports)]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.4), sharey=True, squeeze=False)
    n = len(reports)
    width = 0.8 / n
    colors = plt.get_cmap("tab10")
    x = np.arange(len(METRICS))
    for ax, name in zip(axes[0], names, strict=True):
        for k, rep in enumerate(reports):
            vals = [np.nan if rep.metrics[name][m] is None else 100 * rep.metrics[name][m] for m in METRICS]
            bars = ax.bar(x - 0.4 + width * (k + 0.5), vals, width, color=colors(k % 10), label=rep.method)
            if n <= 4:
                ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(x, METRICS)
        ax.set_title(MATRIX_TITLES[name], fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("% (BWT: percentage points)")
    axes[0][-1].legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Continual-learning metrics per method", fontsize=13)
    return fig


def _comparison_forgetting_figure(reports: Sequence[MethodReport]) -> Figure:
    with_rows = [r for r in reports if r.forgetting]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 3]}, squeeze=True
    )
    if not with_rows:
        for ax in (left, right):
            ax.set_axis_off()
        left.text(0.5, 0.5, "a single stage: nothing to forget yet", ha="center", transform=left.transAxes)
        return fig
    x = np.arange(len(with_rows))
    means = [r.forgetting_mean for r in with_rows]
    _split_bars(left, x, means, 0.6, label=True)
    left.scatter(x, [100 * m["drop"] for m in means], color="black", marker="D", zorder=3, label="net drop")
    left.set_xticks(x, [r.method for r in with_rows], rotation=30, ha="right")
    left.set_ylabel("percentage points (mean over tasks j < T)")
    left.set_title("Mean forgetting per method", fontsize=11)
    left.axhline(0, color="grey", lw=0.8)
    _headroom(left)

    tasks = [row.task for row in with_rows[0].forgetting]
    n = len(with_rows)
    width = 0.8 / n
    for k, rep in enumerate(with_rows):
        by_task = {row.task: row for row in rep.forgetting}
        rows = [by_task[t] for t in tasks if t in by_task]
        xs = np.array([tasks.index(row.task) for row in rows]) - 0.4 + width * (k + 0.5)
        _split_bars(right, xs, rows, width * 0.9, label=False)
        for xi in xs:
            # y in axes units: just below the axis, whatever the data range (0 on a flat run)
            right.text(
                xi, -0.02, rep.method, rotation=90, ha="center", va="top", fontsize=7,
                transform=right.get_xaxis_transform(),
            )  # fmt: skip
    right.set_xticks(np.arange(len(tasks)), task_labels(tasks))
    # the task names go below the rotated method names: as far down as the longest one reaches
    # (a 7 pt character is about 4.2 pt wide)
    longest = max(len(r.method) for r in with_rows)
    right.tick_params(axis="x", pad=8 + 4.2 * longest if n > 1 else 4)
    right.axhline(0, color="grey", lw=0.8)
    _headroom(right)
    right.set_title(
        "Per task j: lost score split by the final answer (bars per method, labelled below)", fontsize=11
    )
    fig.legend(loc="upper center", ncol=4, fontsize=8.5, bbox_to_anchor=(0.5, 1.06), frameon=False)
    fig.tight_layout()
    return fig


def loss_curves(rep: MethodReport) -> dict[str, list[tuple[int, float]]]:
    """Task -> its training loss per logged step (train.json's `loss_curve`; tasks trained
    before it was recorded have none)."""
    import json

    out = {}
    for task in rep.matrices.tasks:
        info = rep.dir.parent / f"task-{task}" / "train.json"
        if info.exists():
            curve = json.loads(info.read_text()).get("loss_curve") or []
            if curve:
                out[task] = [(int(s), float(v)) for s, v in curve]
    return out


def _loss_figure(reports: Sequence[MethodReport]) -> Figure | None:
    """One panel per method, one line per task: the loss over that task's optimizer steps."""
    curves = [(r.method, loss_curves(r)) for r in reports]
    curves = [(m, c) for m, c in curves if c]
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained"
    )
    for ax, (method, by_task) in zip(axes.flat, curves, strict=False):
        for task, curve in by_task.items():
            ax.plot(*zip(*curve, strict=True), label=task, linewidth=1.2)
        ax.set_title(f"{method}: training loss per task")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves) :]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize=7)
    return fig


def _save_loss_figure(reports: Sequence[MethodReport], path: Path) -> bool:
    fig = _loss_figure(reports)
    if fig is None:
        path.unlink(missing_ok=True)
        return False
    save_png(fig, path)
    return True


def _comparison_matrices_figure(reports: Sequence[MethodReport]) -> Figure:
    n = len(reports)
    cols = n if n <= 4 else 3
    rows = (n + cols - 1) // cols
    t = max(len(r.matrices.tasks) for r in reports)
    side = max(3.2, 0.5 * t + 1.2)
    fig, axes = plt.subplots(
        rows, cols, figsize=(side * cols + 1.5, (side + 0.8) * rows), squeeze=False, layout="constrained"
    )
    im = None
    for k, (ax, rep) in enumerate(zip(axes.flat, reports, strict=False)):
        im = _heatmap(
            ax, rep.matrices.values["accuracy"], rep.matrices.tasks, f"{rep.method}: accuracy", k % cols == 0
        )
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="% of test samples")
    return fig


def _comparison_markdown(run_dir: Path, reports: Sequence[MethodReport], loss_plot: bool = False) -> str:
    tasks = max((r.matrices.tasks for r in reports), key=len)
    parts = [
        f"# Run report: `{run_dir.name}`\n\n",
        f"Methods: {', '.join(f'`{r.method}`' for r in reports)}. Task sequence: "
        + " -> ".join(tasks)
        + ".\n",
    ]
    incomplete = [r.method for r in reports if not r.matrices.complete or len(r.matrices.tasks) < len(tasks)]
    if incomplete:
        parts.append(f"\nIn progress (fewer stages than the sequence): {', '.join(incomplete)}.\n")
    parts.append(
        "\n## Methods x metrics\n\nAccuracy matrix a[i][j] (stage i, task j), intended scorer rules; in %. "
        "MFT = mean_j a[j][j], MFN = mean_j a[T][j], MAA = mean_i mean_{j<=i} a[i][j], "
        "BWT = mean_{j<T} (a[T][j] - a[j][j]).\n\n"
    )
    parts.append(
        md_table(
            ["method", *METRICS, "superficial", "essential"],
            [
                [
                    r.method,
                    *(_pct(r.metrics["accuracy"][m], signed=m == "BWT") for m in METRICS),
                    _pct(r.forgetting_mean["superficial"]),
                    _pct(r.forgetting_mean["essential"]),
                ]
                for r in reports
            ],
        )
    )
    for name in ("content", "format", "reference"):
        if all(name in r.metrics for r in reports):
            parts.append(f"\n### {MATRIX_TITLES[name]}\n\n")
            parts.append(
                md_table(
                    ["method", *METRICS],
                    [
                        [r.method, *(_pct(r.metrics[name][m], signed=m == "BWT") for m in METRICS)]
                        for r in reports
                    ],
                )
            )
    parts.append("\n![metrics per method](metrics.png)\n\n## Forgetting: superficial vs essential\n\n")
    parts.append(DEFINITIONS)
    parts.append("\nMean over tasks j < T (percentage points of the task's samples):\n\n")
    parts.append(
        md_table(
            ["method", "drop", "lost", "superficial", "essential", "(format lost too)", "superficial share"],
            [
                [
                    r.method,
                    _pct(r.forgetting_mean["drop"], True),
                    _pct(r.forgetting_mean["lost"]),
                    _pct(r.forgetting_mean["superficial"]),
                    _pct(r.forgetting_mean["essential"]),
                    _pct(r.forgetting_mean["essential_format_lost"]),
                    "n/a"
                    if r.forgetting_mean["superficial_share"] is None
                    else f"{100 * r.forgetting_mean['superficial_share']:.0f}%",
                ]
                for r in reports
            ],
        )
    )
    split_tasks = [row.task for row in max((r.forgetting for r in reports), key=len)]
    if split_tasks:
        parts.append("\nPer task j: superficial / essential (percentage points):\n\n")
        cells = []
        for r in reports:
            by = {row.task: row for row in r.forgetting}
            cells.append(
                [
                    r.method,
                    *(
                        f"{_pct(by[t].superficial)} / {_pct(by[t].essential)}" if t in by else ""
                        for t in split_tasks
                    ),
                ]
            )
        parts.append(md_table(["method", *split_tasks], cells))
    parts.append(
        "\n![superficial vs essential forgetting](forgetting.png)\n\n## Accuracy matrices\n\n"
        "![accuracy matrix per method](matrices.png)\n\n"
    )
    if loss_plot:
        parts.append("## Training loss\n\n![training loss per task and method](loss.png)\n\n")
    parts.append("## Per-method reports\n\n")
    parts += [f"- [{r.method}](../{r.method}/{REPORT_DIR}/report.md)\n" for r in reports]
    return "".join(parts)


def build_report(
    run_dir: str | Path,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    *,
    method_reports: bool = True,
) -> Path:
    """Write every method's report and the comparison under `<run_dir>/report/`; return that dir.

    `methods` defaults to every method with predictions under `run_dir`; `tasks` (the sequence)
    defaults to the order the predictions imply (task k first evaluated at stage k).
    `method_reports=False` writes only the comparison (the pipeline writes each method's report
    in its own step).
    """
    run_dir = Path(run_dir)
    names = ordered_methods(methods if methods is not None else run_methods(run_dir))
    if not names:
        raise FileNotFoundError(f"{run_dir}: no method with task-*/{PREDICTIONS_FILE} files to report on")
    reports = [analyse_method(run_dir, m, tasks) for m in names]
    for rep in reports if method_reports else ():
        write_method_report(rep)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    METRIC_TABLE.write(metric_records(reports), out / "metrics.parquet")
    write_json(
        out / "metrics.json",
        {
            "methods": {
                r.method: {
                    "metrics": r.metrics,
                    "forgetting_mean": r.forgetting_mean,
                    "stages": len(r.matrices.tasks),
                    "complete": r.matrices.complete,
                }
                for r in reports
            },
            "order": names,
            "units": "fractions in [0, 1]; the markdown shows percentages",
        },
    )
    save_png(_metrics_figure(reports), out / "metrics.png")
    save_png(_comparison_forgetting_figure(reports), out / "forgetting.png")
    save_png(_comparison_matrices_figure(reports), out / "matrices.png")
    loss_plot = _save_loss_figure(reports, out / "loss.png")
    _write_text(out / "report.md", _comparison_markdown(run_dir, reports, loss_plot))
    return out


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s:]+)\)")


def self_contained_markdown(report_md: str | Path) -> str:
    """The report as one document that needs no files beside it (a Prefect UI artifact): plots
    inlined as PNG data URIs, links to files beside it turned into their absolute paths (a
    relative link would resolve against the UI's own URL)."""
    report_md = Path(report_md).resolve()
    here = report_md.parent

    def image(m: re.Match[str]) -> str:
        png = here / m.group(2)
        if not png.is_file():
            return f"*({m.group(1)}: {png} is missing)*"
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"

    def link(m: re.Match[str]) -> str:
        return f"{m.group(1)}: `{(here / m.group(2)).resolve()}`"

    return _LINK.sub(link, _IMAGE.sub(image, report_md.read_text()))
