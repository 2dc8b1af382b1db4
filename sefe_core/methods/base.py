"""What a continual method is to the pipeline (docs/design.md §1.3): a fresh LoRA per task, plus
what the method adds around it. A method is one module in this package, registered by name:

- `penalty`: the term added to the new task's loss, given the earlier tasks' directories
  (their adapters, and whatever the method saved after each);
- `after_task`: what it saves in a task's directory once the task is trained (RegLoRA: the mask,
  or its digest; `artifact_name(cfg)` names the file);
- `key_fields` / `after_task_key` / `prior_key`: what of the config and of earlier tasks changes
  what it learns or saves, i.e. its part of the cache keys (sefe_core/keys.py reads them);
- `mergeable`: whether a stage is the base with the adapters merged into W (a method whose
  adapters cannot be merged, such as a mixture of LoRA experts, says False and `train_task`
  refuses it until stages of that kind exist).

Importing a method module must not import torch (a config is validated without it): hooks import
what they need when called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from sefe_core.train_config import TrainConfig

Penalty = Callable[[], "torch.Tensor"]


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContinualMethod:
    """Plain LoRA's behaviour (no penalty, nothing saved); methods override what they add."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # the file it leaves in each task's directory for later tasks (None: nothing); where it
    # depends on the config, `artifact_name(cfg)` says which (the keys read that)
    artifact: ClassVar[str | None] = None
    mergeable: ClassVar[bool] = True
    # True when all `key_fields` names weighs a penalty against earlier tasks (RegLoRA's and the
    # l1 control's λ): the first task, with nothing earlier, trains the same for every value, and
    # its key leaves them out (a sweep over λ trains task 1 once)
    key_fields_need_priors: ClassVar[bool] = False
    # its own settings, read from `train.method_settings.<name>` of the run config
    Settings: ClassVar[type[BaseModel]] = NoSettings

    def settings(self, cfg: TrainConfig) -> BaseModel:
        try:
            return self.Settings.model_validate(cfg.method_settings.get(self.name, {}))
        except Exception as e:
            raise ValueError(f"train.method_settings.{self.name}: {e}") from e

    def artifact_name(self, cfg: TrainConfig | None) -> str | None:
        """The file `after_task` leaves at this config (`artifact` when it does not depend on it)."""
        return self.artifact

    def key_fields(self, cfg: TrainConfig) -> dict[str, Any]:
        """Config values beyond the common training fields that change what this method learns."""
        s = self.settings(cfg).model_dump(mode="json")
        return {"method_settings": s} if s else {}

    def penalty(self, peft_model: Any, prior_task_dirs: Sequence[Path], cfg: TrainConfig) -> Penalty | None:
        """The penalty of the new LoRA (weighted by `penalty_weight`), None for none."""
        return None

    def penalty_weight(self, cfg: TrainConfig) -> float:
        return 0.0

    def after_task(self, task_dir: Path, cfg: TrainConfig) -> Path | None:
        """Save what later tasks read (idempotent: an up-to-date file is kept); its path or None."""
        return None

    def after_task_key(self, cfg: TrainConfig) -> dict[str, Any]:
        """The config values `after_task` reads (the after-task step's cache key)."""
        return {}

    def prior_key(self, prior_task_dir: Path) -> Any:
        """What of an earlier task's own artifact enters the next task's key (None: nothing)."""
        return None
