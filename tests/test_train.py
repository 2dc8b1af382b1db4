"""Per-task training: presets, gradient accumulation with the penalty, the task directory,
staging, and resume after a real kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from data_contracts import INSTRUCTIONS
from sefe_core.adapters import attach_lora, lora_factors
from sefe_core.config import RunConfig, load_config
from sefe_core.mask import MASK_FILE, Mask, load_mask, mask_size, random_mask
from sefe_core.methods import REGISTRY
from sefe_core.stage import export_merged, stage_model
from sefe_core.train import TrainConfig, train_task
from sefe_core.trainer import build_trainer
from sefe_core.vlm import load_vlm

TASKS = ("01-scienceqa", "03-imagenet")
REPO = Path(__file__).resolve().parents[1]


def _tiny_cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=4, per_device_train_batch_size=6, save_steps=2, logging_steps=1, lora_r=4, lora_alpha=8
    )
    return TrainConfig.minicoin(**{**base, **kw})


def test_presets_and_run_config_default():
    ref = TrainConfig()
    assert (ref.lora_r, ref.lora_alpha, ref.lora_dropout, ref.learning_rate) == (128, 256, 0.05, 2e-4)
    assert (ref.projector_lr, ref.warmup_ratio, ref.lr_scheduler_type, ref.num_train_epochs) == (
        2e-5,
        0.03,
        "cosine",
        1.0,
    )
    assert ref.per_device_train_batch_size * ref.gradient_accumulation_steps == 128
    assert (ref.reg_lambda, ref.mask_percent, ref.bf16) == (2.5e3, 2.0, True)
    mini = TrainConfig.minicoin(lora_r=3)
    assert mini.lora_r == 3 and mini.learning_rate != ref.learning_rate and not mini.gradient_checkpointing
    with pytest.raises(ValidationError):
        TrainConfig(learning_rte=1e-3)
    with pytest.raises(ValidationError):
        TrainConfig(preset="huge")
    # in a run config, a partial train section keeps the minicoin preset
    assert RunConfig().train.preset == "minicoin"
    cfg = load_config(None, ["train.learning_rate=0.01"])
    assert cfg.train.preset == "minicoin" and cfg.train.learning_rate == 0.01
    assert cfg.train.lora_r == TrainConfig.minicoin().lora_r
    assert load_config(None, ["train.preset=reference"]).train.lora_r == 128


def test_switching_only_the_preset_in_a_form_switches_its_values():
    """Prefect's form submits every field: a field still at the old preset's value follows the
    new preset; a field the user changed stays."""
    form = RunConfig().model_dump(mode="json")["train"]  # what the UI shows for the default
    switched = TrainConfig.model_validate({**form, "preset": "reference"})
    assert switched.model_dump() == TrainConfig().model_dump()
    edited = TrainConfig.model_validate({**form, "preset": "reference", "learning_rate": 5e-4, "lora_r": 8})
    assert (edited.learning_rate, edited.lora_r, edited.lora_alpha) == (5e-4, 8, 256)
    back = TrainConfig.model_validate({**TrainConfig().model_dump(mode="json"), "preset": "minicoin"})
    assert back.model_dump() == TrainConfig.minicoin().model_dump()


def _samples(bench, task: str, n: int) -> list[dict]:
    recs = [r for r in INSTRUCTIONS.read_records(bench.task_file(task)) if r.split == "train"][:n]
    return [{"image": r.image, "question": r.question, "answer": r.answer} for r in recs]


def _one_step_grads(base_path, bench, masks, *, batch: int, ga: int, lam: float, tmp: Path):
    """Gradients of the first optimizer step (before clipping/stepping) of every trainable param."""
    cfg = _tiny_cfg(
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        reg_lambda=lam,
        max_grad_norm=0.0,
        save_steps=100,
    )
    torch.manual_seed(0)
    model, processor = load_vlm(base_path)
    model = attach_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so the penalty has a gradient from the first step
        for f in lora_factors(model):
            f.b.copy_(torch.randn(f.b.shape, generator=g) * 0.05)
    from sefe_core.regularizer import masked_regularizer

    reg = masked_regularizer(lora_factors(model), masks)
    grads: dict[str, torch.Tensor] = {}

    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            for n, p in model.named_parameters():
                if p.requires_grad:
                    grads[n] = p.grad.detach().clone()

    trainer = build_trainer(
        model, processor, _samples(bench, TASKS[0], 8), bench.image_root, tmp, cfg, reg, [Grab()]
    )
    trainer.train()
    return grads, reg, model


def test_gradient_accumulation_counts_the_penalty_once(small_run, tmp_path):
    """GA=2 x batch 2 gives the gradients of GA=1 x batch 4, penalty included; and the penalty's
    share of the gradient is exactly λ · ∂R/∂θ (Trainer would otherwise count it once per
    micro-batch, since the model's CE is already normalised over the accumulated batch)."""
    _, bench, base = small_run
    model, _ = load_vlm(base.path)
    peft = attach_lora(model, _tiny_cfg())
    shapes = {f.name: f.shape for f in lora_factors(peft)}
    masks = [
        Mask({n: random_mask(s, 10.0, seed=t) for n, s in shapes.items()}, shapes, 10.0, "random")
        for t in range(2)
    ]
    lam = 50.0
    g1, _, _ = _one_step_grads(base.path, bench, masks, batch=4, ga=1, lam=lam, tmp=tmp_path / "a")
    g2, reg, m2 = _one_step_grads(base.path, bench, masks, batch=2, ga=2, lam=lam, tmp=tmp_path / "b")
    g0, _, _ = _one_step_grads(base.path, bench, masks, batch=2, ga=2, lam=0.0, tmp=tmp_path / "c")
    assert g1.keys() == g2.keys() and any("multi_modal_projector" in n for n in g1)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)

    # the penalty's part of the GA=2 gradient is λ · ∂R/∂θ, computed directly on the same weights
    for p in m2.parameters():
        p.grad = None
    reg().backward()
    direct = {n: p.grad for n, p in m2.named_parameters() if p.requires_grad}
    pen_norm = 0.0
    for n in g2:
        expected = lam * direct[n] if direct[n] is not None else torch.zeros_like(g2[n])
        torch.testing.assert_close(g2[n] - g0[n], expected, rtol=1e-4, atol=1e-6, msg=n)
        pen_norm += float(expected.norm())
    assert pen_norm > 1e-3, "the penalty must contribute to the gradient for this test to mean anything"


@pytest.fixture(scope="module")
def first_task(small_run, tmp_path_factory):
    """Task 1 of `reglora`, trained once for the tests below."""
    cfg_run, bench, base = small_run
    run = tmp_path_factory.mktemp("trainrun")
    res = train_task(
        base.path, [], bench.task_file(TASKS[0]), bench.image_root, run / "reglora" / f"task-{TASKS[0]}",
        _tiny_cfg(), "reglora",
    )  # fmt: skip
    return res, run


def test_task_directory_reuse_and_staging(small_run, first_task, tmp_path):
    cfg, bench, base = small_run
    res1, run = first_task
    d1 = res1.task_dir
    assert (d1 / "adapter" / "adapter_config.json").exists() and (
        d1 / "adapter" / "adapter_model.safetensors"
    ).exists()
    assert (d1 / "projector.safetensors").exists() and (d1 / MASK_FILE).exists()
    assert not (d1 / "checkpoints").exists(), "checkpoints are removed once the task is done"
    info = json.loads((d1 / "train.json").read_text())
    assert (
        info["global_step"] == 4 == res1.global_step == res1.steps_run
        and info["config_hash"] == res1.config_hash
    )
    assert info["final_reg_penalty"] is None  # task 1: nothing to protect yet

    mask = load_mask(d1 / MASK_FILE)
    assert mask.kind == "topk" and len(mask.indices) == 7 * cfg.model.tiny.text_layers  # q k v o gate up down
    for name, idx in mask.indices.items():
        out, inn = mask.shapes[name]
        assert idx.dtype == torch.int32 and idx.numel() == mask_size(out * inn, 2.0)
        assert torch.all(idx[1:] > idx[:-1])

    # the mask step on its own: keeps the file, recomputes the same mask; the random control differs
    before = (d1 / MASK_FILE).stat().st_mtime_ns
    assert REGISTRY["reglora"].after_task(d1, _tiny_cfg()) == d1 / MASK_FILE
    assert (d1 / MASK_FILE).stat().st_mtime_ns == before
    rnd_path = REGISTRY["reglora-random"].after_task(d1, _tiny_cfg())  # another kind: rewritten
    rnd = load_mask(rnd_path)
    assert rnd.kind == "random" and not all(
        torch.equal(rnd.indices[n], mask.indices[n]) for n in mask.indices
    )
    wider = load_mask(REGISTRY["reglora"].after_task(d1, _tiny_cfg(mask_percent=5.0)))  # another percent
    assert wider.percent == 5.0 and all(
        wider.indices[n].numel() > mask.indices[n].numel() for n in mask.indices
    )
    again = load_mask(REGISTRY["reglora"].after_task(d1, _tiny_cfg()))  # back: the same top-k mask
    assert all(torch.equal(again.indices[n], mask.indices[n]) for n in mask.indices)

    # task 2 is penalised against task 1's mask
    cfg = _tiny_cfg()
    d2 = run / "reglora" / f"task-{TASKS[1]}"
    res2 = train_task(base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, cfg, "reglora")
    info2 = json.loads((d2 / "train.json").read_text())
    assert info2["final_reg_penalty"] is not None and info2["final_reg_penalty"] > 0
    assert info2["priors"] == [d1.name]

    # a rerun trains nothing and touches nothing
    mtime = (d2 / "train.json").stat().st_mtime_ns
    again = train_task(base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, cfg, "reglora")
    assert again.reused and again.steps_run == 0 and again.global_step == res2.global_step
    assert (d2 / "train.json").stat().st_mtime_ns == mtime
    # a field the method does not read (plain LoRA has no penalty) keeps the task; one it reads
    # trains it again, replacing the old outputs
    assert train_task(
        base.path,
        [d1],
        bench.task_file(TASKS[1]),
        bench.image_root,
        d2,
        _tiny_cfg(mask_percent=9.0),
        "reglora",
    ).reused
    r8 = train_task(
        base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, _tiny_cfg(lora_r=8), "reglora"
    )
    assert not r8.reused and r8.steps_run == 4 and r8.config_hash != res2.config_hash
    assert json.loads((d2 / "train.json").read_text())["config"]["lora_r"] == 8
    res2 = train_task(base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, cfg, "reglora")
    assert not res2.reused  # and back, for what follows

    # the stage after task 2: base + both adapters merged, no LoRA modules left, task 2's projector
    model, _ = stage_model(base.path, [d1, d2])
    assert not any("lora" in n for n, _ in model.named_parameters())
    base_model, _ = load_vlm(base.path)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(dict(model.named_parameters())[name], dict(base_model.named_parameters())[name])
    from safetensors.torch import load_file

    proj = load_file(str(d2 / "projector.safetensors"))
    torch.testing.assert_close(
        model.model.multi_modal_projector.state_dict()["linear_1.weight"], proj["linear_1.weight"]
    )

    out = export_merged(base.path, [d1, d2], tmp_path / "merged")
    exported, _ = load_vlm(out)
    torch.testing.assert_close(dict(exported.named_parameters())[name], dict(model.named_parameters())[name])


def test_killed_training_resumes_to_the_same_adapter(small_run, first_task, tmp_path):
    """A real SIGKILL of a training process mid-task; the restart continues from the last complete
    checkpoint and ends with the adapter (and mask) of an uninterrupted run."""
    _, bench, base = small_run
    res1, _ = first_task
    data, prior = bench.task_file(TASKS[1]), [res1.task_dir]
    sets = dict(
        max_steps=12, per_device_train_batch_size=4, save_steps=3, lora_r=4, lora_alpha=8, logging_steps=1
    )
    cfg = TrainConfig.minicoin(**sets)
    whole = train_task(base.path, prior, data, bench.image_root, tmp_path / "whole", cfg, "reglora")

    task_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sefe_core.train_entry", "--base", str(base.path), "--data", str(data)]
    cmd += ["--image-root", str(bench.image_root), "--task-dir", str(task_dir), "--method", "reglora"]
    cmd += ["--prior", str(res1.task_dir), "--set", "preset=minicoin"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = task_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{log[-2000:]}"
    assert first.exists() and not (task_dir / "train.json").exists()

    # the restart (a new call: model, data, optimizer and RNG state all read back from disk)
    resumed = train_task(base.path, prior, data, bench.image_root, task_dir, cfg, "reglora")
    assert resumed.resumed_from is not None and 0 < resumed.steps_run < 12 and resumed.global_step == 12
    assert json.loads(resumed.train_json.read_text())["resumed_from"] == resumed.resumed_from

    from safetensors.torch import load_file

    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    ma, mb = load_mask(whole.mask_path), load_mask(resumed.mask_path)
    assert all(torch.equal(ma.indices[n], mb.indices[n]) for n in ma.indices)


def test_direct_merge_equals_peft_merge(small_run, first_task):
    """merge_task adds (alpha / r) * B @ A itself; it must give peft's merge_and_unload weights."""
    from peft import PeftModel

    from sefe_core.stage import PROJECTOR_FILE, load_projector, merge_task

    _, _, base = small_run
    task_dir = first_task[0].task_dir
    ours = merge_task(load_vlm(base.path)[0], task_dir)
    theirs = load_vlm(base.path)[0]
    load_projector(theirs, task_dir / PROJECTOR_FILE)
    theirs = PeftModel.from_pretrained(theirs, str(task_dir / "adapter")).merge_and_unload()
    untouched = dict(load_vlm(base.path)[0].named_parameters())
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == ref.keys()
    moved = [n for n in ref if not torch.equal(ref[n], untouched[n])]
    assert any("q_proj" in n for n in moved) and any("multi_modal_projector" in n for n in moved)
    for name, p in ref.items():
        torch.testing.assert_close(mine[name], p, atol=1e-6, rtol=1e-5, msg=name)


def test_loss_curve_is_recorded_and_tensorboard_gets_it(small_run, tmp_path):
    """train.json keeps every logged loss (the report's curve); `report_to: tensorboard` writes
    event files beside the checkpoints, which survive the checkpoints' removal."""
    pytest.importorskip("tensorboard")
    _, bench, base = small_run
    cfg = _tiny_cfg().model_copy(update={"report_to": "tensorboard", "logging_steps": 1})
    task_dir = tmp_path / "lora" / f"task-{TASKS[0]}"
    res = train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, task_dir, cfg, "lora")
    curve = json.loads(res.train_json.read_text())["loss_curve"]
    assert [s for s, _ in curve] == list(range(1, res.global_step + 1))
    assert all(math.isfinite(v) and v > 0 for _, v in curve)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = [p.parent for p in (task_dir / "tensorboard").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [s for s, _ in curve]
    assert not (task_dir / "checkpoints").exists()
    # not part of what is learned: the same task key with or without TensorBoard
    assert cfg.key_fields("lora") == _tiny_cfg().model_copy(update={"logging_steps": 1}).key_fields("lora")
