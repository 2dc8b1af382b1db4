"""One task of the continual sequence (docs/design.md §1.3, §4): a fresh LoRA on the stage that
holds tasks 1..k-1, trained with the method's penalty against the earlier tasks, then whatever
the method saves after a task (RegLoRA: its mask).

One task leaves `<run_dir>/<method>/task-<name>/`:

    adapter/                 peft save_pretrained of this task's LoRA only
    projector.safetensors    the projector after this task (when it is trained)
    mask.safetensors         the method's artifact, for RegLoRA (sorted int32 flat indices per module)
    checkpoints/             Trainer checkpoints while the task runs (removed when it ends)
    train.json               written last: steps, seconds, final loss, the task's key

Where the pieces live: stages and merging `stage.py`, LoRA modules `adapters.py`, the Trainer
`trainer.py`, resume rules `resume.py`, the task's key `keys.py`, methods `methods/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data_contracts import atomic_path, write_json
from sefe_core.adapters import ADAPTER_DIR, ADAPTER_WEIGHTS, attach_lora
from sefe_core.mask import MASK_FILE
from sefe_core.resume import CHECKPOINTS, TRAIN_JSON, prepare_task_dir, trained_with
from sefe_core.stage import PROJECTOR_FILE, save_projector, stage_model
from sefe_core.train_config import PRESETS, RunTrainConfig, TrainConfig, run_default  # noqa: F401 (re-exported)
from sefe_core.trainer import FailpointOnSave, StopOnNonFinite, build_trainer, check_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one task left on disk (paths, not tensors) and what this call did."""

    task_dir: Path
    adapter_dir: Path
    mask_path: Path
    projector_path: Path | None
    train_json: Path
    config_hash: str
    global_step: int  # optimizer steps of the whole task
    steps_run: int  # optimizer steps run by this call (0 when the task was already done)
    train_samples: int
    seconds: float  # wall time of this call's training
    final_loss: float
    resumed_from: str | None
    reused: bool

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _samples(train_records) -> tuple[list[dict[str, Any]] | Path, str]:
    """A task's training data and the digest its key reads. An instructions Parquet stays a path
    (read as a memory-mapped dataset once the processor is loaded, `train_data.py`), keyed by the
    file's sha256 (what the pipeline's steps hand on); records become sample dicts ({image,
    question, answer}), keyed by a hash of their contents."""
    from data_contracts import InstructionRecord, sha256_file

    if isinstance(train_records, str | Path):
        return Path(train_records), sha256_file(train_records)
    else:
        records = list(train_records)
        if records and not isinstance(records[0], InstructionRecord):
            raise TypeError("train_records must be InstructionRecords or the path of an instructions Parquet")
        records = [r for r in records if r.split == "train"]
        h = hashlib.sha256()
        for r in records:
            h.update(json.dumps([r.id, r.image, r.question, r.answer]).encode())
        digest = h.hexdigest()
    if not records:
        raise ValueError("no training records (split == 'train') for this task")
    return [{"image": r.image, "question": r.question, "answer": r.answer} for r in records], digest


def _dataset(path: Path, digest: str, processor: Any, image_root, base_path: Path, cfg: TrainConfig):
    """The task's train records as a memory-mapped dataset, encoded once per data and processor
    (cached next to the data, shared by every method that trains on it)."""
    from sefe_core.hashing import config_hash
    from sefe_core.keys import base_identity
    from sefe_core.train_data import ENCODING_VERSION, train_dataset
    from sefe_core.vlm import VLMCollator

    processor_files = sorted(
        hashlib.sha256(f.read_bytes()).hexdigest()
        for f in base_path.iterdir()
        if f.name.startswith(("tokenizer", "processor", "preprocessor", "chat_template"))
    )
    fingerprint = config_hash(
        [digest, base_identity(base_path), processor_files, cfg.max_length, ENCODING_VERSION]
    )
    collator = VLMCollator(processor, Path(image_root) if image_root is not None else None, cfg.max_length)
    return train_dataset(path, collator, path.parent / ".train-cache", fingerprint)


def task_key(
    cfg: TrainConfig,
    method: str,
    base_path: str | Path,
    prior_task_dirs: Sequence[str | Path],
    data_digest: str,
) -> str:
    """The key this task is recorded under: `keys.train_key` of what it learns from, read from
    the files (the pipeline's train step has the same key: a finished task is found by both)."""
    from sefe_core import keys

    priors = keys.prior_digests(method, prior_task_dirs, cfg)
    return keys.digest(keys.train_key(cfg, method, data_digest, keys.base_identity(base_path), priors))


def _outputs(task_dir: Path) -> list[Path]:
    """The files a finished task is (what later tasks and the evaluation read)."""
    return [p for p in (task_dir / ADAPTER_DIR / ADAPTER_WEIGHTS, task_dir / PROJECTOR_FILE) if p.exists()]


def _damaged_outputs(task_dir: Path) -> list[str]:
    """What of a finished task's outputs is not what its train.json recorded (a task recorded
    before train.json kept hashes: what of its files does not load)."""
    from data_contracts import mismatched

    recorded = json.loads((task_dir / TRAIN_JSON).read_text()).get("files")
    if recorded is None:  # recorded before train.json kept hashes: at least each file must load
        return [why for p in _outputs(task_dir) if (why := _unreadable(p))]
    return [m for rel, sha in recorded.items() if (m := mismatched(task_dir / rel, sha))]


def _unreadable(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_slice(name)
    except Exception as e:  # truncated, not safetensors at all
        return f"{path} cannot be read ({e})"
    return None


def _read_result(task_dir: Path, key: str) -> TrainResult:
    info = json.loads((task_dir / TRAIN_JSON).read_text())
    proj = task_dir / PROJECTOR_FILE
    return TrainResult(
        task_dir=task_dir,
        adapter_dir=task_dir / ADAPTER_DIR,
        mask_path=task_dir / MASK_FILE,
        projector_path=proj if proj.exists() else None,
        train_json=task_dir / TRAIN_JSON,
        config_hash=key,
        global_step=info["global_step"],
        steps_run=0,
        train_samples=info["train_samples"],
        seconds=0.0,
        final_loss=info["final_loss"],
        resumed_from=None,
        reused=True,
    )


def train_task(
    base_path: str | Path,
    prior_task_dirs: Sequence[str | Path],
    train_records,
    image_root: str | Path | None,
    task_dir: str | Path,
    cfg: TrainConfig,
    method: str,
    *,
    trust_remote_code: bool = False,
    callbacks: Sequence[Any] = (),
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train one task of the sequence with `method` (a name from sefe_core.methods), on the stage
    after `prior_task_dirs`. `progress(done, total)` is called every 5% of the optimizer steps.

    `train_records`: InstructionRecords or an instructions Parquet (rows with split == "train").
    Idempotent: a finished task (train.json with the same key) is returned as is with
    `steps_run == 0`; an interrupted one resumes from its last complete Trainer checkpoint.
    """
    from sefe_core.methods import method_of

    algo = method_of(method)
    if not algo.mergeable:  # a stage is base + merged adapters (stage.py); no other kind exists yet
        raise NotImplementedError(
            f"method {algo.name!r} keeps adapters that cannot be merged into W; stages of such methods "
            "are not supported (docs/design.md §1.3)"
        )
    base_path, task_dir = Path(base_path), Path(task_dir)
    priors = [Path(p) for p in prior_task_dirs]
    samples, digest = _samples(train_records)
    key = task_key(cfg, method, base_path, priors, digest)
    if trained_with(task_dir / TRAIN_JSON) == key:
        damaged = _damaged_outputs(task_dir)
        if not damaged:
            # what the method saves after it, at this config (a key may leave out what only shapes
            # that file, e.g. RegLoRA's target on task 1); an up-to-date file is kept. Rank 0 only.
            if os.environ.get("RANK", "0") == "0":
                algo.after_task(task_dir, cfg)
            return _read_result(task_dir, key)
        log.warning("%s is trained again: %s", task_dir, "; ".join(damaged))
        for name in (TRAIN_JSON, PROJECTOR_FILE, algo.artifact_name(cfg)):
            if name:
                (task_dir / name).unlink(missing_ok=True)
        shutil.rmtree(task_dir / ADAPTER_DIR, ignore_errors=True)
    resume = prepare_task_dir(task_dir, key, method, needs_projector=cfg.train_projector)
    ckpt_dir = task_dir / CHECKPOINTS

    from transformers import set_seed

    set_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    model, processor = stage_model(
        base_path,
        priors,
        dtype=torch.bfloat16 if (cfg.bf16 and cuda) else None,
        trust_remote_code=trust_remote_code,
    )
    if isinstance(samples, Path):
        samples = _dataset(samples, digest, processor, image_root, base_path, cfg)
    model = attach_lora(model, cfg)
    penalty = algo.penalty(model, priors, cfg)
    from sefe_core.progress import StepCounter, step_progress

    callbacks = [*callbacks, FailpointOnSave(), StepCounter(), StopOnNonFinite(str(task_dir))]
    if progress is not None:
        callbacks.append(step_progress(progress))
    trainer = build_trainer(
        model,
        processor,
        samples,
        image_root,
        ckpt_dir,
        cfg,
        penalty,
        callbacks,
        reg_lambda=algo.penalty_weight(cfg),
    )

    start_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0
    threads = torch.get_num_threads()
    if cfg.cpu_threads and not cuda:
        torch.set_num_threads(cfg.cpu_threads)
    t0 = time.perf_counter()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final_loss = float(losses[-1]) if losses else float(out.training_loss)
    check_finite(trainer.model, str(task_dir))

    proj_path = task_dir / PROJECTOR_FILE if cfg.train_projector else None
    if trainer.is_world_process_zero():
        # an adapter without train.json is from a finish that was interrupted: replace it
        shutil.rmtree(task_dir / ADAPTER_DIR, ignore_errors=True)
        with atomic_path(task_dir / ADAPTER_DIR) as tmp:
            trainer.model.save_pretrained(str(tmp))
        if proj_path is not None:
            with atomic_path(proj_path) as tmp:
                save_projector(trainer.model, tmp)
        artifact = algo.after_task(task_dir, cfg)
        from data_contracts import sha256_once

        info = {
            # what this task is, checked whenever it is found finished (a damaged or swapped
            # file means it is trained again, never taken as it is)
            "files": {str(p.relative_to(task_dir)): sha256_once(p) for p in _outputs(task_dir)},
            "config_hash": key,
            "method": method,
            "task": task_dir.name.removeprefix("task-"),
            "global_step": int(trainer.state.global_step),
            "steps_run": int(trainer.state.global_step) - start_step,
            "resumed_from": str(resume) if resume else None,
            "train_samples": len(samples),
            "seconds": seconds,
            "final_loss": final_loss,
            "train_loss": float(out.training_loss),
            # every logged step (a resumed task's history comes back from its checkpoint)
            "loss_curve": [
                [int(h["step"]), float(h["loss"])] for h in trainer.state.log_history if "loss" in h
            ],
            "final_reg_penalty": trainer.last_penalty,
            "artifact_bytes": artifact.stat().st_size if artifact is not None else 0,
            "priors": [p.name for p in priors],
            "config": cfg.model_dump(mode="json"),
            "torch": torch.__version__,
            "device": "cuda" if cuda else "cpu",
            "cpu_threads": None if cuda else (cfg.cpu_threads or threads),
        }
        write_json(task_dir / TRAIN_JSON, info)
        if not cfg.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # other ranks return once the files exist
    return TrainResult(
        task_dir=task_dir,
        adapter_dir=task_dir / ADAPTER_DIR,
        mask_path=task_dir / MASK_FILE,
        projector_path=proj_path,
        train_json=task_dir / TRAIN_JSON,
        config_hash=key,
        global_step=int(trainer.state.global_step),
        steps_run=int(trainer.state.global_step) - start_step,
        train_samples=len(samples),
        seconds=seconds,
        final_loss=final_loss,
        resumed_from=str(resume) if resume else None,
        reused=False,
    )


__all__ = [
    "PRESETS",
    "RunTrainConfig",
    "TrainConfig",
    "TrainResult",
    "task_key",
    "train_task",
]
