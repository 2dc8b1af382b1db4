"""Every step's cache key, in one place (docs/design.md §5): what of the config and of its input
artifacts a step's result depends on. The flows hand these dicts to Prefect's cache
(tasks/caching.py hashes them with the step name and task index); the library's own resume
check (`train_task`) hashes the same `train_key`, so both agree on "is this task done?".

Inputs enter as content digests (sha256 of the files a step reads), so a change anywhere
upstream re-runs exactly what reads its output. What each key reads:

| step              | config                                     | inputs                                    |
| ----------------- | ------------------------------------------ | ----------------------------------------- |
| prepare-benchmark | benchmark                                  | CoIN annotation fingerprint               |
| prepare-base      | model                                      |                                           |
| asd               | asd, benchmark.name                        | the task's records                        |
| train             | train (learning fields + the method's own) | data, base, earlier adapters + artifacts  |
| after-task        | what the method's after_task reads         | this task's adapter                       |
| evaluate          | eval                                       | base, adapters 1..k, test records 1..k    |
| method-report     |                                            | the method's predictions                  |
| comparison-report | methods                                    | every method's predictions                |

No torch here: a finished run is shown from its stored results without importing the stack.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sefe_core.methods import method_of

if TYPE_CHECKING:
    from sefe_core.config import RunConfig
    from sefe_core.train_config import TrainConfig

ADAPTER_FILE = "adapter/adapter_model.safetensors"  # inside a task directory (sefe_core.adapters)


def benchmark_key(cfg: RunConfig, inputs: dict | None) -> dict[str, Any]:
    return {"benchmark": cfg.model_dump(mode="json")["benchmark"], "inputs": inputs}


def base_key(cfg: RunConfig) -> dict[str, Any]:
    return {"model": cfg.model_dump(mode="json")["model"]}


def base_identity(base_path: str | Path) -> list[str]:
    """What identifies a base model to the steps that read it: its directory name (a tiny base's
    name carries its build key) and the sha256 of its config.json (not its weights: hashing a 7B
    checkpoint on every step would cost more than the step)."""
    path = Path(base_path)
    cfg = path / "config.json"
    return [path.name, hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.exists() else ""]


def asd_key(cfg: RunConfig, task: str, source_sha256: str) -> dict[str, Any]:
    return {
        # how the server is started does not change what it answers
        "asd": cfg.asd.model_dump(mode="json", exclude={"server": {"launch"}}),
        "benchmark": cfg.benchmark.name,
        "task": task,
        "source": source_sha256,
    }


def train_key(
    train: TrainConfig, method: str, data_sha256: str, base: list[str], priors: Sequence[Sequence[str | None]]
) -> dict[str, Any]:
    """`priors`: per earlier task, [adapter sha256, sha256 of what the method saved after it or None]."""
    return {
        "method": method,
        "train": train.key_fields(method, first_task=not priors),
        "data": data_sha256,
        "base": base,
        "priors": [list(p) for p in priors],
    }


def prior_digests(
    method: str, prior_task_dirs: Sequence[str | Path], train: TrainConfig | None = None
) -> list[list[str | None]]:
    """The `priors` of `train_key` read from the earlier tasks' files (the library's view); which
    file a method left can depend on `train` (RegLoRA's `mask_storage`)."""
    from data_contracts import sha256_once

    artifact = method_of(method).artifact_name(train)
    out: list[list[str | None]] = []
    for d in map(Path, prior_task_dirs):
        if not (d / ADAPTER_FILE).exists():
            raise FileNotFoundError(f"earlier task {d} is not finished (no {ADAPTER_FILE})")
        art = d / artifact if artifact else None
        if art is not None and not art.exists():
            raise FileNotFoundError(f"earlier task {d} has no {artifact} (was its {method} step finished?)")
        out.append([sha256_once(d / ADAPTER_FILE), sha256_once(art) if art is not None else None])
    return out


def after_task_key(train: TrainConfig, method: str, adapter_sha256: str) -> dict[str, Any]:
    return {"method": method, **method_of(method).after_task_key(train), "adapter": adapter_sha256}


def eval_key(
    cfg: RunConfig, method: str, base: list[str], adapters: Sequence[str], tests: Sequence[str]
) -> dict[str, Any]:
    # the settings as they resolve: "auto" and an explicit float32 on a CPU, or a budget left to
    # its default and the same number written out, are the same evaluation. The vLLM settings
    # count only with that backend (hf keys are as before it existed); where vLLM is installed
    # never does.
    vllm = {"backend", "vllm_python", "vllm_engine_args"}
    settings = cfg.model_dump(mode="json", exclude={"eval": {"max_new_tokens", "dtype", *vllm}})["eval"]
    if cfg.eval.backend == "vllm":
        settings |= {"backend": "vllm", "vllm_engine_args": cfg.eval.vllm_engine_args}
    return {
        "method": method,
        "eval": settings,
        "max_new_tokens": cfg.eval.budgets(cfg.benchmark.name, cfg.benchmark.task_names),
        "dtype": cfg.eval.torch_dtype(cfg.train.bf16),
        "base": base,
        "adapters": list(adapters),
        "tests": list(tests),
    }


def method_report_key(method: str, predictions: Sequence[str]) -> dict[str, Any]:
    return {"method": method, "predictions": list(predictions)}


def comparison_key(methods: Sequence[str], predictions: Sequence[Sequence[str]]) -> dict[str, Any]:
    return {"methods": list(methods), "reports": [list(p) for p in predictions]}


def digest(key: dict[str, Any]) -> str:
    """The hash of a key as the library records it (train.json's `config_hash`)."""
    from sefe_core.hashing import config_hash

    return config_hash(json.loads(json.dumps(key, default=str)))
