"""Resuming one task (docs/design.md §4): a finished task is recognised by its `train.json`
recording the task's key; an interrupted one resumes from its newest *complete* Trainer
checkpoint, whose folder records which key it belongs to (`checkpoints/sefe_task_key.json`)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from sefe_core.stage import PROJECTOR_FILE

log = logging.getLogger(__name__)

TRAIN_JSON = "train.json"
CHECKPOINTS = "checkpoints"
KEY_FILE = "sefe_task_key.json"  # inside checkpoints/: which config the checkpoints belong to


_CKPT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(ckpt_dir: Path, needs_projector: bool) -> Path | None:
    """The newest checkpoint whose files were all written (a kill mid-save leaves a partial one,
    which Trainer's own get_last_checkpoint would pick); partial ones are removed."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))
    )
    for _, path in reversed(found):
        complete = (path / "trainer_state.json").exists() and (
            not needs_projector or (path / PROJECTOR_FILE).exists()
        )
        if complete:
            return path
        log.warning("removing incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def trained_with(info_file: Path) -> str | None:
    """The task key recorded in train.json or a checkpoint folder's key file, if any."""
    return json.loads(info_file.read_text())["config_hash"] if info_file.exists() else None


def prepare_task_dir(task_dir: Path, key: str, method: str, needs_projector: bool) -> Path | None:
    """Make `task_dir` ready to train under `key`: outputs and checkpoints of another key (the
    config, data or an earlier task changed) are removed; returns the checkpoint to resume from."""
    from data_contracts import write_json

    ckpt_dir = task_dir / CHECKPOINTS
    old = trained_with(task_dir / TRAIN_JSON) or trained_with(ckpt_dir / KEY_FILE)
    if old is not None and old != key:
        log.warning("%s was trained with another setup (%s != %s): training it again", task_dir, old, key)
        (task_dir / TRAIN_JSON).unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(ckpt_dir / KEY_FILE, {"config_hash": key, "method": method})
    return last_complete_checkpoint(ckpt_dir, needs_projector)
