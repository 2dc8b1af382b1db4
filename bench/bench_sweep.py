"""One `sefe sweep` as a user runs it (a subprocess, its own temporary Prefect server): its wall
time per point, the steps it ran and the steps its points shared, and the sweep's table.

The baseline is the same sweep without sharing: every point's steps run (points x steps per
point); the ratio "steps run / steps without sharing" is exact, not timed. The first point runs
everything, so its wall time is what every point would cost unshared; one run per sweep (a sweep
on the default takes minutes), not a median.

    python bench/bench_sweep.py --set 'methods=[lora,reglora]' \\
        --axis train.method_settings.reglora.target=delta_w,a,b,ab [--section '## ...']
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command_line, load_average, machine, publish, utc_heading  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--axis", action="append", default=[], help="sweep axis field=v1,v2 (repeatable)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--runs-root", type=Path, default=None, help="keep the sweep here (default: a temp dir)")
    p.add_argument("--section", default="## Sweeps: steps shared between points (issue 17)")
    p.add_argument("--note", default="", help="a paragraph under the table (what it shows)")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = a.runs_root or Path(tmp)
        env.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect-home"))
        args = [str(Path(sys.executable).with_name("sefe")), "sweep", "--set", f"runs_root={root}"]
        args += [x for s in a.sets for x in ("--set", s)] + [x for ax in a.axis for x in ("--axis", ax)]
        t0 = time.perf_counter()
        res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=7200)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(
                f"sefe sweep failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
        report = next(root.glob("*-sweep/report"))
        summary = json.loads((report / "sweep.json").read_text())
        table = (
            (report / "sweep.md").read_text().split("## Points x metrics (percent)\n", 1)[1].split("## ")[0]
        )
    per_point = summary["steps"]["per_point"]
    total = summary["steps"]["total"]
    unshared = sum(pt["run"] + pt["reused"] for pt in per_point)
    lines = [
        utc_heading(),
        "",
        f"Command: `{command_line()}`. Machine: {machine()}. Load after: {load_average()}.",
        f"One `sefe sweep` of {len(per_point)} points: {seconds:.0f} s wall (server start and report included).",
        "",
        "| point | s | steps run | steps shared from an earlier point |",
        "| --- | --- | --- | --- |",
        *[f"| {pt['point']} | {pt['seconds']:.0f} | {pt['run']} | {pt['shared']} |" for pt in per_point],
        "",
        f"Steps run: {total['run']} of {unshared} without sharing "
        f"({total['run'] / unshared:.2f}x); {total['shared']} taken from another point.",
        "",
        table.strip(),
    ]
    if a.note:
        lines += ["", a.note]
    publish("\n".join(lines) + "\n", a.section, write=not a.no_write)


if __name__ == "__main__":
    main()
