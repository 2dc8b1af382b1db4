"""The `sefe` console script, run as a user would (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SMALL


def _sefe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("sefe")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_sefe_prepare_builds_and_previews(tmp_path: Path) -> None:
    sets = [a for s in SMALL for a in ("--set", s)]
    first = _sefe("prepare", *sets, "--set", "experiment=cli", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "Benchmark minicoin: 8 tasks, built in" in out and "Held-out pre-training loss" in out
    assert "What the base model sees" in out  # the probe table
    assert "Zero-shot" in out and out.count("08-ocrvqa") >= 2
    run_dir = tmp_path / "runs" / "cli"
    assert len(list(run_dir.glob("benchmark/minicoin-*/*.parquet"))) == 8
    assert len(list(run_dir.glob("base/tiny-llava-*/model.safetensors"))) == 1
    again = _sefe("prepare", *sets, "--set", "experiment=cli", cwd=tmp_path)
    assert again.returncode == 0 and "reused" in again.stdout and "pre-trained in" not in again.stdout


def test_bad_override_is_a_clear_error(tmp_path: Path) -> None:
    res = _sefe("run", "--set", "benchmark.minicoin.n_trian=3", cwd=tmp_path)
    assert res.returncode != 0
    assert "n_trian" in res.stderr + res.stdout
    assert not (tmp_path / "runs").exists()
