"""MiniCoIN: a procedurally generated 8-task benchmark that mirrors CoIN one to one (and, with
`rounds` > 1, runs its eight kinds again as new tasks: a longer sequence).

Every sample is a small PIL-drawn scene (coloured shapes on a dark background, 32-48 px,
square; `scenes.py`) plus a question in the CoIN task's own prompt format, drawn by its task
kind's generator (`sefe_core/kinds/<kind>/`). Each record keeps its scene metadata (objects,
colours, quadrants, boxes) in `meta`, so scorers and the rules rewriter of ASD work without a
model. Same seed -> byte-identical Parquet and PNG files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_contracts import INSTRUCTIONS, FileInfo, InstructionRecord
from sefe_core.hashing import stable_seed

if TYPE_CHECKING:
    from sefe_core.registry import TaskSpec


def _minicoin_tasks(rounds: int = 1) -> tuple[str, ...]:
    from sefe_core.registry import benchmark_tasks

    return tuple(t.name for t in benchmark_tasks("minicoin", rounds))


@dataclass(frozen=True)
class MiniCoINConfig:
    """Sizes of the embedded default: enough training for each task to be learned (75 optimizer
    steps of the minicoin preset), 300 test samples per task (a task score's binomial standard
    deviation is at most 2.9 points; 100 gave 5), and `sefe run` (six methods x eight tasks,
    evaluated after each task) within 6 minutes on 2 CPU cores.

    `rounds` > 1 runs the eight kinds again, as tasks of their own: rounds=2 is a 16-task sequence
    `01-scienceqa` .. `08-ocrvqa`, `09-scienceqa` .. `16-ocrvqa` (fresh seeds; ScienceQA and
    TextVQA ask one question another way, `TaskKind.generate_round`). `tasks` defaults to every
    task of every round; a list picks from them. rounds=1 is left out of the config's dump, so
    the default benchmark keys (and caches) are those of before it existed."""

    seed: int = 0
    n_train: int = 400
    n_test: int = 300
    tasks: tuple[str, ...] | None = None  # None: every task of every round
    rounds: int = 1

    def __post_init__(self) -> None:
        """Sizes that cannot make a benchmark are refused with the config, before anything runs."""
        from sefe_core.registry import check_rounds

        check_rounds("minicoin", self.rounds)
        if self.tasks is None:
            object.__setattr__(self, "tasks", _minicoin_tasks(self.rounds))
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"n_train and n_test must be at least 1 (got {self.n_train}, {self.n_test})")
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one MiniCoIN task")
        known = _minicoin_tasks(self.rounds)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            more = "" if self.rounds > 1 else " (later rounds' tasks need benchmark.minicoin.rounds)"
            raise ValueError(
                f"unknown task(s) {unknown}; MiniCoIN's tasks with rounds={self.rounds}: {list(known)}{more}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"a task appears twice in {list(self.tasks)}")

    def key_fields(self) -> dict[str, Any]:
        """The fields that identify the benchmark: `rounds` only when it is not 1 (a default config
        keys as it did before `rounds` existed; the data depend on the task names anyway)."""
        out = asdict(self)
        if self.rounds == 1:
            del out["rounds"]
        return out


# --------------------------------------------------------------------------------------------
# Writing the benchmark
# --------------------------------------------------------------------------------------------
def generate_task(spec: TaskSpec, split: str, n: int, seed: int, image_root: Path) -> list[InstructionRecord]:
    """Generate one split of one task; images are written as PNG under `image_root/<task>/<split>/`."""
    from sefe_core.kinds import get_kind

    kind = get_kind(spec.scorer)
    later = kind.generate_round if spec.round > 1 else None  # a later round's other phrasing, if any
    rng = np.random.default_rng(stable_seed("minicoin", seed, spec.name, split))
    out_dir = image_root / spec.name / split
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img, q, ans, meta = later(rng, spec.round) if later is not None else kind.generate(rng)
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

    specs = {t.name: t for t in benchmark_tasks("minicoin", config.rounds)}
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
