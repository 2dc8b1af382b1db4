"""Sweeps (docs/design.md §6): a base run config and axes of values, one normal pipeline run per
point of their product, and one report over all of them.

A point is an ordinary run directory `<sweep dir>/<point>/`: `sefe run` on its config would find
it complete. What the points share is found through the step cache, not by this module: every
step's key says what its result depends on (sefe_core/keys.py), so ASD for one X serves every M,
and task 1 of a method serves every λ and M (the flows hand a sweep's points one index of
finished steps, tasks/caching.py). This module only expands the axes, names the points and writes
the report. No Prefect here.

The `seed` axis is a shorthand: it sets the benchmark's, training's and ASD's seed together
(`benchmark.minicoin.seed`, `train.seed`, `asd.seed`), and the report's plots show the mean and
the spread over it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sefe_core.config import RunConfig, apply_overrides

SEED_AXIS = "seed"
SEED_FIELDS = ("benchmark.minicoin.seed", "train.seed", "asd.seed")
INDEX_DIR = ".shared-steps"  # the sweep's index of finished steps (tasks/caching.py)
REPORT_DIR = "report"
OUTCOMES = ("run", "reused", "shared")  # a step ran, was a cache hit, was a hit from another point
METRICS = ("MFT", "MFN", "MAA", "BWT")


@dataclass(frozen=True)
class SweepPoint:
    """One point: its axis values (in axis order), its directory name and its full config."""

    values: dict[str, Any]
    name: str
    config: RunConfig


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """`field=v1,v2,...` -> (field, values); values are YAML, so `[lora,sefe],[lora]` is two lists."""
    if "=" not in text:
        raise ValueError(f"axis {text!r} is not of the form field=value1,value2,...")
    field, raw = (s.strip() for s in text.split("=", 1))
    try:
        values = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError as e:
        raise ValueError(f"axis {field}: values {raw!r} are not a comma-separated YAML list ({e})") from None
    return field, values


def load_axes(path: str | Path) -> dict[str, list[Any]]:
    """Axes from YAML: a mapping field -> list of values (optionally under an `axes:` key)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(data, dict) and set(data) == {"axes"}:
        data = data["axes"]
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: axes must be a mapping of field -> list of values")
    return {str(k): v for k, v in data.items()}


def check_axes(axes: Mapping[str, Sequence[Any]]) -> None:
    if not axes:
        raise ValueError("a sweep needs at least one axis (--axis field=v1,v2)")
    for field, values in axes.items():
        if not values:
            raise ValueError(f"axis {field} has no values")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ValueError(f"axis {field} repeats a value: {list(values)}")
        if field in ("experiment", "runs_root"):
            raise ValueError(f"axis {field}: a sweep names its points' directories itself")
    if SEED_AXIS in axes and set(SEED_FIELDS) & set(axes):
        raise ValueError(f"axis {SEED_AXIS} sets {', '.join(SEED_FIELDS)}: do not sweep those as well")


def _value_text(v: Any) -> str:
    return ",".join(map(_value_text, v)) if isinstance(v, list) else str(v)


def point_name(values: Mapping[str, Any]) -> str:
    """A directory name that says the point: `asd.percent=10_train.mask_percent=0.5`."""
    parts = [f"{k}={_value_text(v)}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", "_".join(parts))


def _overrides(values: Mapping[str, Any]) -> list[str]:
    out = []
    for field, v in values.items():
        for f in SEED_FIELDS if field == SEED_AXIS else (field,):
            out.append(f"{f}={json.dumps(v)}")
    return out


def expand(base: RunConfig, axes: Mapping[str, Sequence[Any]], sweep_dir: Path) -> list[SweepPoint]:
    """Every point of the axes' product as a validated config; a value that does not make a valid
    config is refused here, naming the point, before any point runs."""
    from pydantic import ValidationError

    check_axes(axes)
    data = base.model_dump(mode="json")
    points = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        name = point_name(values)
        raw = json.loads(json.dumps(data))
        try:
            apply_overrides(raw, _overrides(values))
            raw.update(runs_root=str(sweep_dir), experiment=name)
            cfg = RunConfig.model_validate(raw)
        except ValidationError as e:
            why = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"sweep point {name}: {why}") from None
        except ValueError as e:
            raise ValueError(f"sweep point {name}: {e}") from None
        _check_method_settings(cfg, name)
        points.append(SweepPoint(values, name, cfg))
    if len({p.name for p in points}) != len(points):
        raise ValueError("two points of the sweep get the same directory name; use distinct values")
    return points


def _check_method_settings(cfg: RunConfig, name: str) -> None:
    """`train.method_settings` is an open mapping: each method checks its own part now, so a
    misspelt setting stops the sweep before its first point, not at the point that reads it."""
    from sefe_core.methods import method_of

    for method in cfg.methods:
        try:
            method_of(method).settings(cfg.train)
        except ValueError as e:
            raise ValueError(f"sweep point {name}: {e}") from None


def default_sweep_dir(base: RunConfig) -> Path:
    return (Path(base.runs_root) / f"{base.experiment}-sweep").absolute()


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def point_rows(points: Sequence[SweepPoint], metrics_paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per (point, method): the axis values, the accuracy metrics and the forgetting
    split in percent (sefe_core.analysis.headline_rows of the point's comparison report)."""
    from sefe_core.analysis import headline_rows, metrics_summary

    rows = []
    for p, path in zip(points, metrics_paths, strict=True):
        for r in headline_rows(metrics_summary(path)):
            rows.append({"point": p.name, **{k: _value_text(v) for k, v in p.values.items()}, **r})
    return rows


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def axis_summary(rows: Sequence[dict[str, Any]], axes: Mapping[str, Sequence[Any]], axis: str,
                 metric: str) -> dict[str, list[tuple[float, float, int]]]:  # fmt: skip
    """Per method, per value of `axis` (in axis order): (mean, standard deviation over seeds,
    number of seeds) of `metric`. Points that differ only in other axes are averaged first, so
    the spread is the seed noise, not the other axes' effect (0 without a seed axis)."""
    out: dict[str, list[tuple[float, float, int]]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeded = SEED_AXIS in axes and axis != SEED_AXIS
    seeds: list[str | None] = [_value_text(s) for s in axes[SEED_AXIS]] if seeded else [None]
    for m in methods:
        series = []
        for v in axes[axis]:
            per_seed = []
            for s in seeds:
                sel = [
                    r[metric]
                    for r in rows
                    if r["method"] == m
                    and r[axis] == _value_text(v)
                    and (s is None or r[SEED_AXIS] == s)
                    and r[metric] is not None
                ]
                if sel:
                    per_seed.append(sum(sel) / len(sel))
            mean = sum(per_seed) / len(per_seed) if per_seed else math.nan
            var = sum((x - mean) ** 2 for x in per_seed) / (len(per_seed) - 1) if len(per_seed) > 1 else 0.0
            series.append((mean, math.sqrt(var), len(per_seed)))
        out[m] = series
    return out


def _axis_figure(rows: Sequence[dict[str, Any]], axes: Mapping[str, Sequence[Any]], axis: str) -> Any:
    from sefe_core.report import plt  # pyplot on the Agg backend, as the run reports use it

    values = list(axes[axis])
    xs = values if _numeric(values) else list(range(len(values)))
    fig, grid = plt.subplots(1, len(METRICS), figsize=(3.4 * len(METRICS), 3.0), squeeze=False)
    for ax, metric in zip(grid[0], METRICS, strict=True):
        for method, series in axis_summary(rows, axes, axis, metric).items():
            mean = [s[0] for s in series]
            spread = [s[1] for s in series]
            ax.errorbar(xs, mean, yerr=spread, marker="o", capsize=3, label=method)
        ax.set_title(metric)
        ax.set_xlabel(axis)
        ax.set_xticks(xs, [_value_text(v) for v in values])
        ax.grid(alpha=0.3)
    grid[0][0].set_ylabel("percent")
    grid[0][-1].legend(fontsize=7, loc="best")
    seeds = len(axes.get(SEED_AXIS, [])) if axis != SEED_AXIS else 0
    spread = f"bars: standard deviation over {seeds} seeds" if seeds > 1 else "one seed: no spread shown"
    fig.suptitle(f"{axis}: mean over the other axes' values; {spread}", fontsize=9)
    fig.tight_layout()
    return fig


def _rows_table(rows: Sequence[dict[str, Any]]) -> str:
    from sefe_core.report import md_table

    if not rows:
        return "(no rows)\n"

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    return md_table(list(rows[0]), [[cell(v) for v in r.values()] for r in rows])


def step_totals(steps: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Steps run / reused / shared over every point."""
    return {k: sum(s.get(k, 0) for s in steps.values()) for k in OUTCOMES}


def write_report(sweep_dir: Path, axes: Mapping[str, Sequence[Any]], points: Sequence[SweepPoint],
                 metrics_paths: Sequence[str | Path], steps: Mapping[str, Mapping[str, int]]) -> Path:  # fmt: skip
    """`<sweep dir>/report/`: sweep.md (the table, the plots, the step counts), points.parquet
    (the table), axis-<field>.png per axis, sweep.json (axes, points, counts)."""
    import pandas as pd

    from data_contracts import atomic_path
    from sefe_core.report import save_png

    out = Path(sweep_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows = point_rows(points, metrics_paths)
    with atomic_path(out / "points.parquet") as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    plots = []
    for axis in axes:
        name = f"axis-{re.sub(r'[^A-Za-z0-9._-]', '-', axis)}.png"
        save_png(_axis_figure(rows, axes, axis), out / name)
        plots.append((axis, name))
    total = step_totals(steps)
    step_rows = [{"point": p.name, **{k: steps[p.name].get(k, 0) for k in (*OUTCOMES, "seconds")}}
                 for p in points]  # fmt: skip
    by_step = {p.name: steps[p.name].get("by_step", {}) for p in points}
    md = [
        f"# Sweep: {len(points)} points over {', '.join(axes)}\n",
        f"Sweep directory: `{Path(sweep_dir).absolute()}`; each point is a run directory of its own.\n",
        "## Points x metrics (percent)\n",
        _rows_table(rows),
        "## Per axis\n",
        *[f"![{axis}]({name})\n" for axis, name in plots],
        "## Steps run and reused\n",
        f"In this invocation {total['run']} steps ran and {total['reused']} were reused from the cache, "
        f"{total['shared']} of them finished by another point of this sweep (its files linked in).\n",
        _rows_table(step_rows),
    ]
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text("\n".join(md))
    summary = {
        "axes": {k: list(v) for k, v in axes.items()},
        "points": [{"name": p.name, "values": p.values, "metrics": str(m)} for p, m in zip(points, metrics_paths, strict=True)],
        "steps": {"total": total, "per_point": step_rows, "by_step": by_step},
    }  # fmt: skip
    with atomic_path(out / "sweep.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    return out


def values_of(axes_texts: Iterable[str]) -> dict[str, list[Any]]:
    """`--axis` options -> axes (one option per field)."""
    axes: dict[str, list[Any]] = {}
    for text in axes_texts:
        field, values = parse_axis(text)
        if field in axes:
            raise ValueError(f"axis {field} given twice")
        axes[field] = values
    return axes
