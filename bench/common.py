"""Plumbing shared by the scripts in bench/: machine description, load, medians, BENCHMARKS.md.

Every benchmark records the same context next to its figures (what machine, how loaded it was)
and files its entry under its own `## ` section of BENCHMARKS.md, so the figures of one benchmark
stay together however many runs and benchmarks are appended.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from data_contracts import atomic_path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine(with_torch: bool = True) -> str:
    """CPU model, core count and (optionally) torch version and threads: what the figures depend on."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if with_torch:
        import torch

        text += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return text


def load_average() -> str:
    """`uptime`'s 1/5/15-minute load averages: the machine is shared, so timings need this context."""
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    except OSError:
        return "n/a"
    return out.strip().split("load average:")[-1].strip()


def medians(times: Mapping[str, Iterable[float]]) -> dict[str, float]:
    """Median per mode: robust to the odd run slowed down by other processes on a shared machine."""
    return {mode: statistics.median(ts) for mode, ts in times.items()}


def command_line() -> str:
    """How this benchmark was started, as a reader would retype it from the repository root."""
    script = Path(sys.argv[0])
    shown = script.relative_to(ROOT) if script.is_absolute() and script.is_relative_to(ROOT) else script
    return "python " + " ".join([str(shown), *sys.argv[1:]])


def utc_heading() -> str:
    """The `### YYYY-MM-DD HH:MM UTC` heading that dates one entry."""
    return f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"


def append_section(path: Path, section: str, entry: str) -> None:
    """Put `entry` at the end of `section` (a `## ` heading, created if missing) of `path`.

    Entries are appended to their own benchmark's section rather than to the end of the file, so
    that one benchmark's history reads in one place; the file is replaced atomically.
    """
    import fcntl

    # two benchmarks finishing at once must not lose one another's entry (read-modify-write)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _append_locked(path, section, entry)


def _append_locked(path: Path, section: str, entry: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n"
    head, rest = text.split(section, 1)
    nxt = rest.find("\n## ")
    body, tail = (rest, "") if nxt < 0 else (rest[:nxt], rest[nxt:])
    with atomic_path(path) as tmp:
        tmp.write_text(head + section + body.rstrip("\n") + "\n\n" + entry.rstrip("\n") + "\n" + tail)


def publish(entry: str, section: str, write: bool = True, path: Path = BENCHMARKS_MD) -> None:
    """Print `entry` and, unless `write` is false (`--no-write`), append it to `section` of `path`."""
    print(entry)
    if write:
        append_section(path, section, entry)
        print(f"appended to {path}")


# LLaVA-1.5-7B's language model (Vicuna-7B): the shapes the 7B-scale benchmarks build
HIDDEN, INTER, LAYERS_7B = 4096, 11008, 32
MODULES_7B = {  # LoRA'd linear layer -> (out, in) of its ΔW
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
# LLaVA-1.5-7B: 7.06e9 parameters (Vicuna-7B 6.74e9 + CLIP ViT-L/336 0.30e9 + projector 0.02e9)
LLAVA_7B_PARAMS = 7.06e9
