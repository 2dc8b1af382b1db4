"""Screenshots of what a person sees of a run in the Prefect UI (issue 15): a real `prefect server
start` with its UI, a small pipeline run reported to it, then headless Chromium on the report
artifact, the compact metrics table and the flow run's page.

    python scripts/ui_screenshots.py --out runs/ui-screenshots     # ~3 min on 2 cores

Needs Debian's chromium (`apt-get install chromium`). The artifact pages are opened directly
(`/artifacts/artifact/<id>`): a plain `--screenshot` ignores a `?tab=` in the URL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = [
    "experiment=ui-screenshots",
    "benchmark.minicoin.n_train=24",
    "benchmark.minicoin.n_test=6",
    "train.max_steps=6",
    "train.logging_steps=1",  # a loss curve in the report
    "methods=[lora,asd,reglora,sefe]",
]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=20000",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise SystemExit(f"prefect server did not come up at {url}")


def shoot(chromium: str, url: str, png: Path, size: str) -> Path:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
             f"--screenshot={png}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "ui-screenshots")
    ap.add_argument(
        "--runs-root", type=Path, default=None, help="where the small run goes (default: a temp dir)"
    )
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="sefe-ui-"))
    runs_root = args.runs_root or home / "runs"
    port = _free_port()
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    log = open(home / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait(f"{api}/health", server)
        sets = [a for s in [f"runs_root={runs_root}", *SMALL] for a in ("--set", s)]
        subprocess.run([str(BIN / "sefe"), "run", *sets], env=env, check=True, cwd=REPO)
        arts = httpx.post(f"{api}/artifacts/filter", json={"sort": "CREATED_DESC"}, timeout=30).json()
        latest = {}
        for a in arts:
            latest.setdefault(a["key"] or a["id"], a)
        flow_run = latest["sefe-report"]["flow_run_id"]
        shots = {
            "report.png": (f"{ui}/artifacts/artifact/{latest['sefe-report']['id']}", "1400,5200"),
            "metrics-table.png": (f"{ui}/artifacts/artifact/{latest['sefe-metrics']['id']}", "1400,900"),
            "flow-run.png": (f"{ui}/runs/flow-run/{flow_run}", "1600,1400"),
            "artifacts.png": (f"{ui}/artifacts", "1600,1400"),
        }
        for name, (url, size) in shots.items():
            print(f"{shoot(chromium, url, args.out / name, size)}  <- {url}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    main()
