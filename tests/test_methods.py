"""The registry of continual methods and its variants, and O-LoRA: the method that proves a new
method needs only its own module (sefe_core/methods/olora.py) and its registry entry."""

from __future__ import annotations

import json

import pytest
import torch

from sefe_core.adapters import LoraFactors
from sefe_core.config import load_config
from sefe_core.methods import REGISTRY, SHORTHANDS, uses_asd, variant
from sefe_core.methods.olora import OLoRASettings, OrthogonalPenalty
from sefe_core.train import TrainConfig, train_task

TASKS = ("01-scienceqa", "03-imagenet")


def test_variants_name_a_method_and_its_data() -> None:
    assert {"lora", "reglora", "reglora-random", "l1", "olora"} <= set(REGISTRY)
    assert (variant("sefe").method.name, variant("sefe").data) == ("reglora", "asd")
    assert (variant("asd").method.name, variant("asd").data) == ("lora", "asd")
    assert (variant("olora+asd").method.name, variant("olora+asd").data) == ("olora", "asd")
    assert variant("reglora").data == "original" and not uses_asd("l1") and uses_asd("sefe")
    assert set(SHORTHANDS) == {"asd", "sefe"}
    with pytest.raises(ValueError, match="unknown method 'nope'.*olora"):
        variant("nope")
    with pytest.raises(ValueError, match="unknown method"):
        load_config(None, ["methods=[lora,nope]"])
    assert load_config(None, ["methods=[lora,olora+asd]"]).methods == ["lora", "olora+asd"]


def test_a_methods_settings_enter_only_its_own_key() -> None:
    cfg = TrainConfig.minicoin(method_settings={"olora": {"lambda_orth": 0.1}})
    assert cfg.key_fields("olora") != TrainConfig.minicoin().key_fields("olora")
    assert cfg.key_fields("lora") == TrainConfig.minicoin().key_fields("lora")
    assert "reg_lambda" in cfg.key_fields("reglora") and "reg_lambda" not in cfg.key_fields("olora")
    with pytest.raises(ValueError, match="method_settings.olora"):
        REGISTRY["olora"].settings(TrainConfig.minicoin(method_settings={"olora": {"lambda_ort": 1.0}}))


def _factors(seed: int, r: int = 3, shapes=((12, 10), (8, 20))) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraFactors(
            f"m{i}",
            torch.randn(r, inn, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(out, r, generator=g, dtype=torch.float64).requires_grad_(),
        )
        for i, (out, inn) in enumerate(shapes)
    ]


def test_orthogonal_penalty_value_and_gradient() -> None:
    new = _factors(0)
    olds = [_factors(1), _factors(2)]
    old_a = {f.name: torch.cat([o[i].a.detach() for o in olds]) for i, f in enumerate(new)}
    s = OLoRASettings(lambda_orth=0.5, lambda_l2=0.01)
    value = OrthogonalPenalty(new, old_a, s)()
    value.backward()
    # written out: sum over modules and earlier tasks of |A_new A_old^T|, plus the L2 norms
    ref_a = [f.a.detach().clone().requires_grad_() for f in new]
    ref_b = [f.b.detach().clone().requires_grad_() for f in new]
    orth = sum((a @ o[i].a.detach().t()).abs().sum() for i, a in enumerate(ref_a) for o in olds)
    l2 = sum(a.norm() + b.norm() for a, b in zip(ref_a, ref_b, strict=True))
    ref = 0.5 * orth + 0.01 * l2
    ref.backward()
    assert abs(value.item() - ref.item()) < 1e-9
    for f, a, b in zip(new, ref_a, ref_b, strict=True):
        torch.testing.assert_close(f.a.grad, a.grad)
        torch.testing.assert_close(f.b.grad, b.grad)


def test_orthogonal_subspaces_cost_nothing() -> None:
    """A new A whose rows are orthogonal to every earlier A's rows has no orthogonality penalty."""
    basis = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64)).Q  # orthonormal columns
    old = basis[:, :4].t().contiguous()  # an earlier task's A: 4 rows
    new_a = basis[:, 4:7].t().contiguous().requires_grad_()
    f = LoraFactors("m", new_a, torch.zeros(5, 3, dtype=torch.float64, requires_grad=True))
    assert OrthogonalPenalty([f], {"m": old}, OLoRASettings())().item() < 1e-12
    with pytest.raises(ValueError, match="do not cover"):
        OrthogonalPenalty([f], {}, OLoRASettings())


def test_olora_trains_a_sequence_penalised_against_earlier_adapters(small_run, tmp_path) -> None:
    cfg_run, bench, base = small_run

    def cfg(**kw) -> TrainConfig:
        return TrainConfig.minicoin(
            max_steps=3, logging_steps=1, lora_r=4, lora_alpha=8, per_device_train_batch_size=4, **kw
        )

    d1, d2 = (tmp_path / "olora" / f"task-{t}" for t in TASKS)
    r1 = train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d1, cfg(), "olora")
    assert (
        json.loads((d1 / "train.json").read_text())["final_reg_penalty"] is None
    )  # task 1: nothing to protect
    assert not (d1 / "mask.safetensors").exists()  # O-LoRA saves nothing after a task
    r2 = train_task(base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, cfg(), "olora")
    pen = json.loads((d2 / "train.json").read_text())["final_reg_penalty"]
    assert pen is not None and pen > 0 and r2.steps_run == 3 and r1.steps_run == 3
    # its own setting re-trains the task; the same call again is reused
    again = train_task(base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, cfg(), "olora")
    assert again.reused
    other = cfg(method_settings={"olora": {"lambda_orth": 5.0}})
    r3 = train_task(base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, other, "olora")
    assert r3.steps_run == 3 and r3.config_hash != r2.config_hash


def test_a_method_defined_elsewhere_trains_with_no_other_change(small_run, tmp_path) -> None:
    """The registry is the only place a method is known: one defined here (an L2 penalty on the
    new B, saving a file after each task that the next task's key reads) trains a sequence."""
    from sefe_core import keys
    from sefe_core.methods import register
    from sefe_core.methods.base import ContinualMethod

    class SmallB(ContinualMethod):
        name = "test-small-b"
        artifact = "note.json"

        def penalty(self, peft_model, prior_task_dirs, cfg):
            from sefe_core.adapters import lora_factors

            factors = lora_factors(peft_model)
            return (lambda: sum((f.b**2).sum() for f in factors)) if prior_task_dirs else None

        def penalty_weight(self, cfg) -> float:
            return 1.0

        def after_task(self, task_dir, cfg):
            path = task_dir / self.artifact
            path.write_text(json.dumps({"task": task_dir.name}))
            return path

    register(SmallB)
    try:
        _, bench, base = small_run
        cfg = TrainConfig.minicoin(
            max_steps=4, logging_steps=1, lora_r=2, lora_alpha=4, per_device_train_batch_size=4
        )
        d1, d2 = (tmp_path / "test-small-b" / f"task-{t}" for t in TASKS)
        train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d1, cfg, "test-small-b")
        assert (d1 / "note.json").exists()
        r2 = train_task(base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, cfg, "test-small-b")
        assert json.loads((d2 / "train.json").read_text())["final_reg_penalty"] > 0
        # the earlier task's artifact enters the next task's key
        assert keys.prior_digests("test-small-b", [d1])[0][1] is not None
        (d1 / "note.json").write_text("changed")
        again = train_task(
            base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, cfg, "test-small-b"
        )
        assert again.steps_run == 4 and again.config_hash != r2.config_hash
        assert variant("test-small-b+asd").data == "asd"
    finally:
        REGISTRY.pop("test-small-b", None)


def test_a_method_whose_adapters_cannot_be_merged_is_refused(small_run, tmp_path) -> None:
    from sefe_core.methods import register
    from sefe_core.methods.base import ContinualMethod

    class Experts(ContinualMethod):
        name = "test-experts"
        mergeable = False

    register(Experts)
    try:
        _, bench, base = small_run
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            train_task(
                base.path,
                [],
                bench.task_file(TASKS[0]),
                bench.image_root,
                tmp_path / "t",
                TrainConfig.minicoin(),
                "test-experts",
            )
        assert not (tmp_path / "t").exists()
    finally:
        REGISTRY.pop("test-experts", None)
