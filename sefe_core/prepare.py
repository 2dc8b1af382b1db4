"""The ground every run stands on: the benchmark's records and images, and the base model.

Both are cached on disk under the run directory, keyed by the hash of the config that made
them, and appear atomically, so a second call (or a resumed run) reuses them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_contracts import INSTRUCTIONS, atomic_path, mismatched, write_json
from sefe_core.coin import build_coin, input_fingerprint
from sefe_core.config import RunConfig
from sefe_core.hashing import config_hash
from sefe_core.minicoin import build_minicoin
from sefe_core.registry import task_spec
from sefe_core.scorers import judge
from sefe_core.tiny_config import BaseModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark on disk: `<dir>/<task>.parquet` + images under `<dir>/images/`."""

    name: str
    dir: Path
    tasks: tuple[str, ...]
    sha256: dict[str, str]
    seconds: float
    reused: bool
    # per-task counts (train, test, rejected, top reject reasons) of a loaded benchmark (CoIN)
    counts: dict | None = field(default=None, hash=False, compare=False)

    @property
    def image_root(self) -> Path:
        return self.dir / "images"

    def task_file(self, task: str) -> Path:
        return self.dir / f"{task}.parquet"


def task_counts(bench: Benchmark) -> dict[str, dict]:
    """Per task: train and test records as written, rejected records and their top reasons (a
    loaded benchmark keeps them in its index; a generated one rejects nothing)."""
    import pyarrow.parquet as pq

    loaded = (bench.counts or {}).get("tasks", {})
    out = {}
    for task in bench.tasks:
        splits = pq.read_table(bench.task_file(task), columns=["split"]).column("split").to_pylist()
        known = loaded.get(task, {})
        out[task] = {
            "train": splits.count("train"),
            "test": splits.count("test"),
            "rejected": known.get("rejected", 0),
            "reasons": known.get("reasons", {}),
        }
    return out


def load_benchmark(path: str | Path) -> Benchmark:
    """A benchmark directory written by `ensure_benchmark` (its `benchmark.json` index)."""
    path = Path(path)
    index = path / "benchmark.json"
    if not index.exists():
        raise FileNotFoundError(f"{path} is not a benchmark directory (no benchmark.json)")
    info = json.loads(index.read_text())
    return Benchmark(
        info["name"], path, tuple(info["tasks"]), info["sha256"], info["seconds"], True, info.get("counts")
    )


def _reusable(final: Path) -> Benchmark | None:
    """The benchmark already at `final` if every task file is the one its index records; a
    damaged or replaced one means the directory is rebuilt (never re-blessed as it is)."""
    if not (final / "benchmark.json").exists():
        return None
    bench = load_benchmark(final)
    problems = [m for t in bench.tasks if (m := mismatched(bench.task_file(t), bench.sha256[t]))]
    if not problems:
        return bench
    log.warning("benchmark %s is rebuilt: %s", final, "; ".join(problems))
    shutil.rmtree(final)
    return None


def ensure_benchmark(cfg: RunConfig) -> Benchmark:
    """The run's benchmark directory, built once per config (and, for CoIN, per input files)."""
    if cfg.benchmark.name == "coin":
        return _ensure_coin(cfg)
    mc = cfg.benchmark.minicoin
    key = config_hash({"name": cfg.benchmark.name, "minicoin": mc.key_fields()})
    final = cfg.run_dir / "benchmark" / f"{cfg.benchmark.name}-{key}"
    if (bench := _reusable(final)) is not None:
        return bench
    t0 = time.perf_counter()
    with atomic_path(final) as tmp:
        infos = build_minicoin(tmp, mc)
        seconds = time.perf_counter() - t0
        sha = {t: i.sha256 for t, i in infos.items()}
        write_json(
            tmp / "benchmark.json",
            {
                "name": cfg.benchmark.name,
                "key": key,
                "tasks": list(mc.tasks),
                "sha256": sha,
                "seconds": seconds,
            },
        )
    return Benchmark(cfg.benchmark.name, final, tuple(mc.tasks), sha, seconds, False)


def benchmark_inputs(cfg: RunConfig) -> dict | None:
    """What the benchmark is built from besides its config (CoIN: the annotation files'
    fingerprint; MiniCoIN: nothing, it is generated): part of the prepare step's cache key."""
    return input_fingerprint(cfg.benchmark.coin) if cfg.benchmark.name == "coin" else None


def _ensure_coin(cfg: RunConfig) -> Benchmark:
    """CoIN from local files: keyed by the coin config and a cheap fingerprint (size, mtime_ns)
    of every annotation / ground-truth file read, so edited annotations rebuild the records."""
    cc = cfg.benchmark.coin
    assert cc is not None  # BenchmarkConfig's validator guarantees it
    key = config_hash({"name": "coin", "coin": cc, "inputs": input_fingerprint(cc)})
    final = cfg.run_dir / "benchmark" / f"coin-{key}"
    if (bench := _reusable(final)) is not None:
        return bench
    t0 = time.perf_counter()
    with atomic_path(final) as tmp:
        build = build_coin(tmp, cc)
        seconds = time.perf_counter() - t0
        write_json(
            tmp / "benchmark.json",
            {
                "name": "coin",
                "key": key,
                "tasks": list(cc.tasks),
                "sha256": build.sha256,
                "seconds": seconds,
                "counts": build.counts(),
            },
        )
    return Benchmark("coin", final, tuple(cc.tasks), build.sha256, seconds, False, build.counts())


def ensure_base_model(cfg: RunConfig, progress: Callable[[str, int, int], None] | None = None) -> BaseModel:
    """The run's base model: the tiny one (shipped, cached or built here; `progress(phase, done,
    total)` follows a build) or a local llava-hf directory."""
    if cfg.model.kind == "tiny":
        from sefe_core.tiny_vlm import ensure_tiny_vlm

        return ensure_tiny_vlm(cfg.run_dir / "base", cfg.model.tiny, progress)
    if not cfg.model.path or not Path(cfg.model.path).is_dir():
        raise FileNotFoundError(
            f"model.kind=pretrained needs model.path to be a local llava-hf directory, got {cfg.model.path!r}"
        )
    path = Path(cfg.model.path)
    return BaseModel(
        path,
        config_hash(str(path.resolve())),
        float("nan"),
        float("nan"),
        0.0,
        reused=True,
        origin="pretrained",
    )


@dataclass(frozen=True)
class PreviewRow:
    task: str
    id: str
    question: str
    reference: str
    prediction: str
    format_ok: bool
    score: float


def zero_shot_preview(
    cfg: RunConfig, bench: Benchmark, base: BaseModel, n_per_task: int = 3
) -> list[PreviewRow]:
    """The base model's answers on a few test samples of every task, before any continual step."""
    from sefe_core.vlm import generate_answers, load_vlm

    model, processor = load_vlm(base.path, trust_remote_code=cfg.model.trust_remote_code)
    rows: list[PreviewRow] = []
    rng = random.Random(cfg.benchmark.minicoin.seed)
    for task in bench.tasks:
        recs = [r for r in INSTRUCTIONS.read_records(bench.task_file(task)) if r.split == "test"]
        picked = rng.sample(recs, min(n_per_task, len(recs)))
        spec = task_spec(cfg.benchmark.name, task)
        preds = generate_answers(
            model,
            processor,
            [{"image": r.image, "question": r.question} for r in picked],
            image_root=bench.image_root,
            max_new_tokens=spec.max_new_tokens,
        )
        for r, p in zip(picked, preds, strict=True):
            j = judge(spec, p, r.answer, r.meta_dict)
            rows.append(PreviewRow(task, r.id, r.question, r.answer, p, j.format_ok, j.score))
    return rows
