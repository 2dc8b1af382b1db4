"""Wall time of the main job, `sefe run` on the embedded default, as a user runs it.

Cold: a fresh run directory (benchmark, pre-training, ASD, six methods x eight tasks, evaluation,
reports; Prefect's temporary server started by the run). Rerun: the same command again on the
finished directory (everything cached). Each is a real `sefe run` subprocess, `--repeats` times
(cold runs in separate directories, interleaved with the reruns); medians go to BENCHMARKS.md.
The issue's targets: cold <= 5 minutes, rerun <= 15 s, on 2 cores.

    python bench/bench_sefe_run.py [--repeats 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import load_average, machine, medians, publish, utc_heading  # noqa: E402


def sefe_run(runs_root: Path, sets: list[str], env: dict[str, str]) -> tuple[float, str]:
    args = [str(Path(sys.executable).with_name("sefe")), "run", "--set", f"runs_root={runs_root}"]
    args += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"sefe run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    work = re.search(r"Work done now: (\d+) training steps, (\d+) generations", res.stdout)
    return seconds, f"{work.group(1)} steps, {work.group(2)} generations" if work else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to BENCHMARKS.md")
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    times: dict[str, list[float]] = {"cold": [], "rerun": []}
    work: dict[str, str] = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-sefe-run-") as tmp:
        env["PREFECT_HOME"] = str(Path(tmp) / "prefect-home")
        for i in range(a.repeats):
            root = Path(tmp) / f"runs-{i}"
            for mode in ("cold", "rerun"):
                seconds, done = sefe_run(root, a.sets, env)
                times[mode].append(seconds)
                work[mode] = done
                loads.append(load_average())
                print(f"{mode} {i + 1}/{a.repeats}: {seconds:.1f} s ({done})", flush=True)
    med = medians(times)
    cmd = "python bench/bench_sefe_run.py " + " ".join(
        [f"--repeats {a.repeats}", *(f"--set {shlex.quote(s)}" for s in a.sets)]
    )
    rows = "\n".join(
        f"| {mode} | {med[mode]:.1f} | {', '.join(f'{t:.1f}' for t in times[mode])} | {work[mode]} |"
        for mode in ("cold", "rerun")
    )
    entry = f"""{utc_heading()}

Command: `{cmd}` (each a real `sefe run` subprocess on the embedded default{
        " + " + ", ".join(a.sets) if a.sets else ""
    }). Machine: {machine()}. Load average after each run: {"; ".join(loads)}.

| mode | median s | runs (s) | work done |
| --- | --- | --- | --- |
{rows}

Rerun / cold: {med["rerun"] / med["cold"]:.3f}. Targets (issue 11): cold <= 360 s, rerun <= 10 s."""
    publish(entry, "## `sefe run`: wall time of the main job, cold and rerun (issue 6)", write=not a.no_write)


if __name__ == "__main__":
    main()
