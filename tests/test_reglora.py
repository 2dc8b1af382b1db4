"""RegLoRA masks and regulariser: values and gradients against a direct dense reference."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from sefe_core.adapters import LoraFactors, lora_factors, lora_target_regex
from sefe_core.mask import Mask, extract_mask, load_mask, mask_size, random_mask, save_mask, topk_mask
from sefe_core.methods import REGISTRY
from sefe_core.regularizer import MultisetIndex, Regularizer, as_pairs, masked_regularizer
from sefe_core.train_config import TrainConfig

SHAPES = {"layers.0.q_proj": (12, 10), "layers.0.up_proj": (20, 10), "layers.0.down_proj": (10, 20)}


def _factors(dtype=torch.float64, r: int = 4, seed: int = 0) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraFactors(
            name,
            torch.randn(r, s[1], generator=g, dtype=torch.float64).to(dtype).requires_grad_(),
            torch.randn(s[0], r, generator=g, dtype=torch.float64).to(dtype).requires_grad_(),
        )
        for name, s in SHAPES.items()
    ]


def _overlapping_masks(n_tasks: int = 3, percent: float = 20.0) -> list[Mask]:
    """Random masks per task and module, plus forced overlaps: task t repeats part of task 0."""
    masks = []
    for t in range(n_tasks):
        idx = {}
        for j, (name, shape) in enumerate(SHAPES.items()):
            m = random_mask(shape, percent, seed=100 * t + j)
            if t > 0:  # share the first few positions with task 0
                m = torch.unique(torch.cat([masks[0].indices[name][:5], m[5:]])).to(torch.int32)
            idx[name] = m
        masks.append(Mask(idx, dict(SHAPES), percent, "random"))
    return masks


def _dense_reference(factors: list[LoraFactors], masks: list[Mask]) -> torch.Tensor:
    """The formula of docs/design.md §1.2 written out: concatenate all earlier index lists (multiset),
    gather from the dense B @ A, |.|, mean per module, mean over modules."""
    terms = []
    for f in factors:
        flat = torch.cat([m.indices[f.name] for m in masks]).long()
        terms.append((f.b @ f.a).reshape(-1)[flat].abs().mean())
    return torch.stack(terms).mean()


def _grads(factors):
    out = [(f.a.grad.clone(), f.b.grad.clone()) for f in factors]
    for f in factors:
        f.a.grad = None
        f.b.grad = None
    return out


def test_regularizer_matches_dense_reference_value_and_gradients():
    factors = _factors()
    masks = _overlapping_masks()
    index = {f.name: MultisetIndex.union([m.indices[f.name] for m in masks]) for f in factors}
    assert all(ix.extra.numel() > 0 for ix in index.values()), "the test needs repeated positions"
    reg = Regularizer(factors, index)
    value = reg()
    value.backward()
    ours = _grads(factors)
    ref = _dense_reference(factors, masks)
    ref.backward()
    theirs = _grads(factors)
    assert abs(value.item() - ref.item()) < 1e-6
    for (ga, gb), (ra, rb) in zip(ours, theirs, strict=True):
        torch.testing.assert_close(ga, ra, atol=1e-6, rtol=0)
        torch.testing.assert_close(gb, rb, atol=1e-6, rtol=0)
    # the int64 (row, col) formulation of the reference implementation gives the same value
    pairs = {f.name: torch.cat([as_pairs(m.indices[f.name], SHAPES[f.name]) for m in masks]) for f in factors}
    from sefe_core.regularizer import reference_penalty

    assert abs(reference_penalty(factors, pairs).item() - ref.item()) < 1e-9


def test_multiset_counts_repeated_positions_several_times():
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)  # r=1, in=2
    b = torch.tensor([[1.0], [3.0]], dtype=torch.float64, requires_grad=True)  # out=2
    # ΔW = [[1, 2], [3, 6]]; masks {0} and {0, 3}: multiset {0, 0, 3} -> (1 + 1 + 6) / 3
    masks = [torch.tensor([0], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)]
    reg = Regularizer([LoraFactors("m", a, b)], {"m": MultisetIndex.union(masks)})
    assert reg().item() == pytest.approx(8 / 3)
    # a set union would give (1 + 6) / 2
    assert reg().item() != pytest.approx(7 / 2)


def test_zero_update_gives_zero_gradient():
    """At the start of a task B = 0, so ΔW = 0: |.| has subgradient 0 there (torch's convention),
    the penalty must not push B in an arbitrary direction."""
    f = _factors()[0]
    with torch.no_grad():
        f.b.zero_()
    reg = Regularizer([f], {f.name: MultisetIndex.union([random_mask(SHAPES[f.name], 30, 1)])})
    reg().backward()
    assert reg().item() == 0.0
    assert torch.count_nonzero(f.a.grad) == 0 and torch.count_nonzero(f.b.grad) == 0


def test_l1_control_matches_dense_reference():
    factors = _factors()
    reg = Regularizer(factors, None)
    value = reg()
    value.backward()
    ours = _grads(factors)
    ref = torch.stack([(f.b @ f.a).abs().mean() for f in factors]).mean()
    ref.backward()
    theirs = _grads(factors)
    assert abs(value.item() - ref.item()) < 1e-9
    for (ga, gb), (ra, rb) in zip(ours, theirs, strict=True):
        torch.testing.assert_close(ga, ra, atol=1e-9, rtol=0)
        torch.testing.assert_close(gb, rb, atol=1e-9, rtol=0)


def test_float32_regularizer_is_close_to_float64_reference():
    factors = _factors(torch.float32)
    masks = _overlapping_masks()
    index = {f.name: MultisetIndex.union([m.indices[f.name] for m in masks]) for f in factors}
    ref = _dense_reference(_factors(torch.float64), masks)
    assert abs(Regularizer(factors, index)().item() - ref.item()) < 1e-5


def test_topk_mask_and_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    a, b = torch.randn(4, 30), torch.randn(25, 4)
    name = "model.language_model.layers.0.mlp.up_proj"
    # a peft-style adapter file: one module
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {f"base_model.model.{name}.lora_A.weight": a, f"base_model.model.{name}.lora_B.weight": b},
        str(adapter / "adapter_model.safetensors"),
    )
    mask = extract_mask(adapter, percent=2.0, device="cpu")
    idx = mask.indices[name]
    k = mask_size(25 * 30, 2.0)
    assert idx.dtype == torch.int32 and idx.numel() == k == 15
    assert torch.all(idx[1:] > idx[:-1]), "sorted, no duplicates"
    expected = torch.argsort((b @ a).abs().reshape(-1), descending=True)[:k].sort().values
    assert torch.equal(idx.long(), expected)
    assert torch.equal(topk_mask(b @ a, 2.0), idx)

    path = save_mask(mask, tmp_path / "mask.safetensors")
    back = load_mask(path)
    assert torch.equal(back.indices[name], idx) and back.shapes[name] == (25, 30)
    assert back.percent == 2.0 and back.kind == "topk"

    rnd = extract_mask(adapter, percent=2.0, kind="random", seed=7)
    assert rnd.indices[name].numel() == k and not torch.equal(rnd.indices[name], idx)
    assert torch.equal(rnd.indices[name], extract_mask(adapter, 2.0, "random", seed=7).indices[name])


def test_load_mask_rejects_non_masks(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3, dtype=torch.int32)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="not a SEFE mask"):
        load_mask(tmp_path / "m.safetensors")
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "missing.safetensors")


def test_lora_targets_language_model_only_and_only_new_lora_is_penalised(small_run, tmp_path):
    from peft import LoraConfig, get_peft_model

    from sefe_core.vlm import load_vlm

    _, _, base = small_run
    model, _ = load_vlm(base.path)
    regex = lora_target_regex(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = [n for n in linear if re.fullmatch(regex, n)]
    assert hit and all(".language_model." in n for n in hit)
    assert not any(("vision_tower" in n) or ("projector" in n) or n == "lm_head" for n in hit)
    assert len(hit) == 7 * model.config.text_config.num_hidden_layers

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=regex, init_lora_weights=False)
    )
    shapes = {n.removeprefix("base_model.model."): None for n in hit}
    masks = []
    for t in range(2):
        idx, shp = {}, {}
        for n, m in peft_model.named_modules():
            if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict):
                key = n.removeprefix("base_model.model.")
                shp[key] = (m.out_features, m.in_features)
                idx[key] = random_mask(shp[key], 5.0, seed=t)
        masks.append(Mask(idx, shp, 5.0, "random"))
    assert set(masks[0].indices) == set(shapes)
    reg = masked_regularizer(lora_factors(peft_model), masks)
    assert reg is not None and reg.mask_nbytes == 4 * sum(
        m.numel() for mk in masks for m in mk.indices.values()
    )
    reg().backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    cfg = TrainConfig.minicoin()
    assert REGISTRY["lora"].penalty(peft_model, [tmp_path], cfg) is None
    assert REGISTRY["reglora"].penalty(peft_model, [], cfg) is None  # first task: nothing to protect


def test_topk_mask_breaks_ties_by_index():
    """A ΔW whose rows of B are still zero has many equal |ΔW| at the threshold: the mask is the
    same function of ΔW every time (the lowest tied indices), not topk's arbitrary pick."""
    b = torch.zeros(64, 4)
    b[:2] = torch.randn(2, 4)  # 2 of 64 rows learned anything: 2 x 64 non-zero entries
    dw = b @ torch.randn(4, 64)
    k = mask_size(dw.numel(), 5.0)  # 205 > the 128 non-zero entries: 77 zeros join in
    idx = topk_mask(dw, 5.0)
    assert idx.numel() == k
    nonzero = set(dw.reshape(-1).nonzero().squeeze(1).tolist())
    assert nonzero <= set(idx.tolist())
    assert sorted(set(idx.tolist()) - nonzero) == sorted(set(range(4096)) - nonzero)[: k - len(nonzero)]
    assert all(torch.equal(topk_mask(dw.clone(), 5.0), idx) for _ in range(5))


def test_a_mask_file_is_the_same_bytes_in_every_process(tmp_path):
    """Its sha256 enters the next task's key: a mask saved again in another process (a resumed
    run) must not look like a new mask (safetensors orders several metadata entries at random)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from sefe_core.mask import Mask, save_mask; "
        "m = Mask({'q': torch.arange(7, dtype=torch.int32), 'k': torch.arange(3, dtype=torch.int32)}, "
        "{'q': (7, 1), 'k': (3, 1)}, 2.0, 'topk'); save_mask(m, sys.argv[1], source={'adapter_sha256': 'x'})"
    )
    shas = set()
    for i in range(4):
        path = tmp_path / f"m{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        shas.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(shas) == 1
