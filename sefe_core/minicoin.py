"""MiniCoIN: a procedurally generated 8-task benchmark that mirrors CoIN one to one.

Every sample is a small PIL-drawn scene (coloured shapes on a dark background, 32-48 px,
square; `scenes.py`) plus a question in the CoIN task's own prompt format, drawn by its task
kind's generator (`sefe_core/kinds/<kind>/`). Each record keeps its scene metadata (objects,
colours, quadrants, boxes) in `meta`, so scorers and the rules rewriter of ASD work without a
model. Same seed -> byte-identical Parquet and PNG files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_contracts import INSTRUCTIONS, FileInfo, InstructionRecord
from sefe_core.hashing import stable_seed

if TYPE_CHECKING:
    from sefe_core.registry import TaskSpec


def _minicoin_tasks() -> tuple[str, ...]:
    from sefe_core.registry import benchmark_tasks

    return tuple(t.name for t in benchmark_tasks("minicoin"))


@dataclass(frozen=True)
class MiniCoINConfig:
    """Sizes of the embedded default: enough training for each task to be learned (75 optimizer
    steps of the minicoin preset), 100 test samples per task (one sample = 1 point), and `sefe
    run` (six methods x eight tasks, evaluated after each task) within 6 minutes on 2 CPU cores."""

    seed: int = 0
    n_train: int = 400
    n_test: int = 100
    tasks: tuple[str, ...] = field(default_factory=_minicoin_tasks)

    def __post_init__(self) -> None:
        """Sizes that cannot make a benchmark are refused with the config, before anything runs."""
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"n_train and n_test must be at least 1 (got {self.n_train}, {self.n_test})")
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one MiniCoIN task")
        unknown = [t for t in self.tasks if t not in _minicoin_tasks()]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; MiniCoIN's tasks: {list(_minicoin_tasks())}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"a task appears twice in {list(self.tasks)}")


# --------------------------------------------------------------------------------------------
# Writing the benchmark
# --------------------------------------------------------------------------------------------
def generate_task(spec: TaskSpec, split: str, n: int, seed: int, image_root: Path) -> list[InstructionRecord]:
    """Generate one split of one task; images are written as PNG under `image_root/<task>/<split>/`."""
    from sefe_core.kinds import get_kind

    gen = get_kind(spec.scorer).generate
    rng = np.random.default_rng(stable_seed("minicoin", seed, spec.name, split))
    out_dir = image_root / spec.name / split
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img, q, ans, meta = gen(rng)
        rel = f"{spec.name}/{split}/{i:05d}.png"
        img.save(image_root / rel, format="PNG", optimize=False)
        rid = f"{spec.name}-{split}-{i:05d}"
        records.append(
            InstructionRecord(
                id=rid,
                task=spec.name,
                split=split,
                image=rel,
                question=q,
                answer=ans,
                style=spec.native_style,
                origin="original",
                source_id=rid,
                meta=json.dumps(meta, sort_keys=True),
            )
        )
    return records


def build_minicoin(out_dir: str | Path, config: MiniCoINConfig = MiniCoINConfig()) -> dict[str, FileInfo]:
    """Write `<out_dir>/<task>.parquet` (train + test records) and `<out_dir>/images/`.

    Returns the file info (sha256, bytes) of each task's Parquet.
    """
    out_dir = Path(out_dir)
    from sefe_core.registry import benchmark_tasks

    specs = {t.name: t for t in benchmark_tasks("minicoin")}
    unknown = [t for t in config.tasks if t not in specs]
    if unknown:
        raise KeyError(f"MiniCoIN has no task(s) {unknown}; tasks: {list(specs)}")
    if config.n_train < 1 or config.n_test < 1:
        raise ValueError("MiniCoIN needs n_train >= 1 and n_test >= 1")
    infos = {}
    for name in config.tasks:
        spec = specs[name]
        records = generate_task(spec, "train", config.n_train, config.seed, out_dir / "images")
        records += generate_task(spec, "test", config.n_test, config.seed, out_dir / "images")
        infos[name] = INSTRUCTIONS.write(records, out_dir / f"{name}.parquet")
    return infos
