"""Run configuration: typed (pydantic, so Prefect's UI can render it as a form), loadable from
YAML, overridable with `key.sub=value` strings from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from sefe_core.minicoin import MiniCoINConfig
from sefe_core.tiny_vlm import TinyVLMConfig


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["minicoin"] = "minicoin"
    minicoin: MiniCoINConfig = Field(default_factory=MiniCoINConfig)


class ModelConfig(BaseModel):
    """`tiny` builds the embedded model offline; `pretrained` loads a local llava-hf directory."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["tiny", "pretrained"] = "tiny"
    path: str | None = None
    trust_remote_code: bool = False
    tiny: TinyVLMConfig = Field(default_factory=TinyVLMConfig)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiment: str = "minicoin-demo"
    runs_root: str = "runs"
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.experiment


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
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return RunConfig.model_validate(apply_overrides(data, overrides or []))
