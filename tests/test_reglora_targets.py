"""RegLoRA's regularisation target (ΔW, A, B or both; the SEFE paper's ablation) and mask storage
(`file` or `recompute` from the adapter against a digest): masks, penalties, keys, two-task runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sefe_core import keys
from sefe_core.adapters import LoraFactors
from sefe_core.config import load_config
from sefe_core.mask import (
    DIGEST_FILE,
    MASK_FILE,
    digest_task_mask,
    extract_mask,
    extract_task_mask,
    load_mask,
    mask_size,
    random_mask,
    recompute_task_mask,
)
from sefe_core.methods import REGISTRY
from sefe_core.regularizer import masked_regularizer
from sefe_core.train_config import TrainConfig

R = 3
TASKS = ("01-scienceqa", "03-imagenet")  # as tests/test_train.py
SHAPES = {"layers.0.q_proj": (12, 10), "layers.0.up_proj": (20, 10), "layers.0.down_proj": (10, 20)}
TARGETS = ["delta_w", "a", "b", "ab"]


def _write_adapter(task_dir, seed: int = 0):
    """A peft-style adapter of SHAPES in `task_dir/adapter`; returns {module: (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    for name, (o, i) in SHAPES.items():
        a, b = torch.randn(R, i, generator=g), torch.randn(o, R, generator=g)
        factors[name] = (a, b)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    (task_dir / "adapter").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(task_dir / "adapter" / "adapter_model.safetensors"))
    return factors


def _rewrite(path, tensors) -> None:
    """Save `tensors` over `path` with a later mtime (a same-size rewrite within one clock tick
    would otherwise look unchanged to sha256_once's (path, size, mtime) cache)."""
    import os

    st = os.stat(path)
    save_file(tensors, str(path))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _new_lora(seed: int = 5) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraFactors(
            n,
            torch.randn(R, i, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(o, R, generator=g, dtype=torch.float64).requires_grad_(),
        )
        for n, (o, i) in SHAPES.items()
    ]


def _grads(factors: list[LoraFactors]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each factor's gradient (zeros where autograd left none), cleared for the next backward."""
    out = []
    for f in factors:
        out.append(tuple(torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in (f.a, f.b)))
        f.a.grad = f.b.grad = None
    return out


def _reference(factors: list[LoraFactors], masks, target: str) -> torch.Tensor:
    """The target's penalty written out with plain autograd: per module, the multiset (all earlier
    index lists concatenated) gathered from the flattened matrix, |.|, mean; `ab` the mean of the
    A and B terms; mean over modules."""
    terms = []
    for f in factors:
        mats = {"delta_w": (f.name, f.b @ f.a), "a": (f"{f.name}::A", f.a), "b": (f"{f.name}::B", f.b)}
        parts = ["a", "b"] if target == "ab" else [target]
        sub = []
        for p in parts:
            key, mat = mats[p]
            flat = torch.cat([m.indices[key] for m in masks]).long()
            sub.append(mat.reshape(-1)[flat].abs().mean())
        terms.append(torch.stack(sub).mean())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("target", TARGETS)
def test_mask_entries_shapes_and_sizes_per_target(tmp_path, target):
    fac = _write_adapter(tmp_path)
    mask = extract_mask(tmp_path / "adapter", percent=10.0, device="cpu", target=target)
    assert mask.target == target
    expected = {
        "delta_w": {n: (o, i) for n, (o, i) in SHAPES.items()},
        "a": {f"{n}::A": (R, i) for n, (o, i) in SHAPES.items()},
        "b": {f"{n}::B": (o, R) for n, (o, i) in SHAPES.items()},
    }
    want = {**expected["a"], **expected["b"]} if target == "ab" else expected[target]
    assert mask.shapes == want
    for key, idx in mask.indices.items():
        rows, cols = want[key]
        assert idx.dtype == torch.int32 and idx.numel() == mask_size(rows * cols, 10.0)
        module, _, part = key.partition("::")
        a, b = fac[module]
        mat = {"": b @ a, "A": a, "B": b}[part]
        top = torch.argsort(mat.abs().reshape(-1), descending=True)[: idx.numel()].sort().values
        assert torch.equal(idx.long(), top), key
    # the file keeps the target (absent for ΔW: a default file's bytes are as before targets)
    path = extract_task_mask(tmp_path, 10.0, "topk", 0, target)
    back = load_mask(path)
    assert back.target == target and back.shapes == want
    meta = json.loads(_metadata(path))
    assert ("target" in meta) == (target != "delta_w")


def _metadata(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["sefe_mask"]


@pytest.mark.parametrize("target", TARGETS)
def test_penalty_per_target_matches_autograd_reference_and_touches_only_its_factors(tmp_path, target):
    masks = []
    for t in range(3):  # three earlier tasks; overlapping positions make the multiset count twice
        _write_adapter(tmp_path / f"t{t}", seed=t % 2)
        masks.append(extract_mask(tmp_path / f"t{t}" / "adapter", 20.0, device="cpu", target=target))
    factors = _new_lora()
    reg = masked_regularizer(factors, masks, target)
    assert any(ix.extra.numel() for ix in reg.index.values()), "the test needs repeated positions"
    value = reg()
    value.backward()
    ours = _grads(factors)
    ref = _reference(factors, masks, target)
    ref.backward()
    theirs = _grads(factors)
    assert abs(value.item() - ref.item()) < 1e-9
    for f, (ga, gb), (ra, rb) in zip(factors, ours, theirs, strict=True):
        torch.testing.assert_close(ga, ra, atol=1e-9, rtol=0)
        torch.testing.assert_close(gb, rb, atol=1e-9, rtol=0)
        # a factor target: the gradient is on that factor only, and only at its masked positions
        for part, g in (("A", ga), ("B", gb)):
            key = f"{f.name}::{part}"
            if target == "delta_w":
                assert torch.count_nonzero(g) > 0
            elif part.lower() in target:
                hit = torch.zeros(g.numel(), dtype=torch.bool)
                hit[torch.cat([m.indices[key] for m in masks]).long()] = True
                assert torch.count_nonzero(g.reshape(-1)[~hit]) == 0
                assert torch.count_nonzero(g.reshape(-1)[hit]) == hit.sum()
            else:
                assert torch.count_nonzero(g) == 0, f"{target} must not move {part}"


def test_a_mask_for_another_target_is_refused(tmp_path):
    _write_adapter(tmp_path)
    path = extract_task_mask(tmp_path, 10.0, "topk", 0, "a")
    with pytest.raises(ValueError, match="target 'a', the config's is 'delta_w'"):
        masked_regularizer(_new_lora(), [str(path)], "delta_w")
    with pytest.raises(ValueError, match="target 'b'"):
        masked_regularizer(_new_lora(), [str(path), extract_mask(tmp_path / "adapter", 10.0, target="b")])
    # and the method refuses it from the config's side
    cfg = TrainConfig.minicoin(method_settings={"reglora": {"target": "b"}})
    with pytest.raises(ValueError, match="target 'a', the config's is 'b'"):
        REGISTRY["reglora"].penalty(_peft_like(), [tmp_path], cfg)


def _peft_like():
    """A module tree `lora_factors` reads: LoRA A/B ModuleDicts under SHAPES' names."""
    root = torch.nn.Module()
    base = torch.nn.Module()
    root.add_module("base_model", base)
    model = torch.nn.Module()
    base.add_module("model", model)
    layers = torch.nn.Module()
    model.add_module("layers", layers)
    zero = torch.nn.Module()
    layers.add_module("0", zero)
    for name, (o, i) in SHAPES.items():
        m = torch.nn.Module()
        m.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(i, R, bias=False)})
        m.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(R, o, bias=False)})
        zero.add_module(name.rsplit(".", 1)[1], m)
    return root


def test_settings_are_validated_and_shared_by_the_control():
    bad = TrainConfig.minicoin(method_settings={"reglora": {"target": "w"}})
    with pytest.raises(ValueError, match="method_settings.reglora"):
        REGISTRY["reglora"].settings(bad)
    cfg = TrainConfig.minicoin(method_settings={"reglora": {"target": "ab"}})
    assert REGISTRY["reglora-random"].settings(cfg).target == "ab"
    own = TrainConfig.minicoin(method_settings={"reglora-random": {"target": "a"}})
    with pytest.raises(ValueError, match="reads train.method_settings.reglora"):
        REGISTRY["reglora-random"].settings(own)


@pytest.mark.parametrize("kind", ["topk", "random"])
@pytest.mark.parametrize("target", ["delta_w", "ab"])
def test_recompute_gives_the_file_storage_mask_and_penalty(tmp_path, kind, target):
    _write_adapter(tmp_path / "task-01")
    d = tmp_path / "task-01"
    file_mask = load_mask(extract_task_mask(d, 10.0, kind, 3, target))
    digest = digest_task_mask(d, 10.0, kind, 3, target)
    assert digest.name == DIGEST_FILE and digest.stat().st_size < 4096
    before = digest.stat().st_mtime_ns
    assert digest_task_mask(d, 10.0, kind, 3, target) == digest and digest.stat().st_mtime_ns == before
    again = recompute_task_mask(d, target)
    assert again.indices.keys() == file_mask.indices.keys()
    assert all(torch.equal(again.indices[k], file_mask.indices[k]) for k in file_mask.indices)
    factors = _new_lora()
    p_file = masked_regularizer(factors, [str(d / MASK_FILE)], target)()
    p_rec = masked_regularizer(factors, [again], target)()
    assert p_file.item() == p_rec.item()
    with pytest.raises(ValueError, match="target"):
        recompute_task_mask(d, "b")


def test_recompute_refuses_a_changed_adapter_or_digest(tmp_path):
    d = tmp_path / "task-01"
    _write_adapter(d)
    path = digest_task_mask(d, 10.0, "topk", 0)
    meta = json.loads(path.read_text())
    # a digest whose entry does not match what the adapter gives: named
    name = "layers.0.up_proj"
    meta["entries"][name][1] = "0" * 16
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"task-01 differs from its digest at {name}"):
        recompute_task_mask(d)
    # an adapter that is not the one the digest was made from
    digest_task_mask(d, 10.0, "topk", 1)  # another seed: rewritten, valid again
    recompute_task_mask(d)
    weights = d / "adapter" / "adapter_model.safetensors"
    t = load_file(str(weights))
    t[f"base_model.model.{name}.lora_B.weight"][0, 0] += 1.0
    _rewrite(weights, t)
    with pytest.raises(ValueError, match="is not the adapter the mask digest of task task-01"):
        recompute_task_mask(d)
    # no digest at all
    path.unlink()
    with pytest.raises(FileNotFoundError, match="mask.digest.json"):
        recompute_task_mask(d)


def test_recompute_detects_a_drift_behind_a_matching_adapter_sha(tmp_path, monkeypatch):
    """The adapter is the same file, but the recomputation gives another mask (another tie rule,
    a library or device that ranks differently): a ValueError naming the entry, never silence."""
    import sefe_core.mask as mask_mod

    d = tmp_path / "task-01"
    _write_adapter(d)
    digest_task_mask(d, 10.0, "topk", 0, "a")
    real = mask_mod.topk_mask
    monkeypatch.setattr(mask_mod, "topk_mask", lambda m, p: real(m, p).flip(0).contiguous())
    with pytest.raises(ValueError, match=r"differs from its digest at layers\.0\.down_proj::A"):
        recompute_task_mask(d, "a")


# ---- keys -----------------------------------------------------------------------------------


METHODS = ["lora", "sefe", "reglora-random", "l1", "olora"]
MASKED = ["sefe", "reglora-random"]


def _step_keys(*changes: str) -> dict[str, str]:
    cfg = load_config(None, [f"methods=[{','.join(METHODS)}]", *changes])
    out = {}
    for m in METHODS:
        priors = [["sha-of-adapter-1", "sha-of-mask-1"]]
        out[f"train {m}"] = keys.digest(keys.train_key(cfg.train, m, "sha-of-data", ["b", "c"], priors))
        out[f"after-task {m}"] = keys.digest(keys.after_task_key(cfg.train, m, "sha-of-adapter-2"))
    return out


def test_default_keys_are_unchanged_and_non_defaults_enter_them():
    default = load_config(None, []).train
    # the keys' contents of a default config: exactly the fields before targets and storage
    assert REGISTRY["reglora"].key_fields(default) == {"reg_lambda": default.reg_lambda}
    fields = default.key_fields("reglora")
    assert "mask_storage" not in fields and "target" not in fields
    assert REGISTRY["reglora"].after_task_key(default) == {"mask_percent": 2.0, "kind": "topk", "seed": 0}
    base = _step_keys()
    assert base == _step_keys("train.mask_storage=file", "train.method_settings={reglora: {target: delta_w}}")
    for change in ("train.mask_storage=recompute", "train.method_settings={reglora: {target: a}}"):
        after = _step_keys(change)
        changed = sorted(k for k in base if base[k] != after[k])
        expected = [*(f"train {m}" for m in MASKED), *(f"after-task {m}" for m in MASKED)]
        assert changed == sorted(expected), change


def test_artifact_depends_on_mask_storage(tmp_path):
    m = REGISTRY["reglora"]
    assert m.artifact == MASK_FILE  # the pipeline runs its after-task step either way
    assert m.artifact_name(None) == m.artifact_name(TrainConfig()) == MASK_FILE
    assert m.artifact_name(TrainConfig(mask_storage="recompute")) == DIGEST_FILE
    assert REGISTRY["lora"].artifact_name(TrainConfig(mask_storage="recompute")) is None
    d = tmp_path / "task-01"
    _write_adapter(d)
    (d / "adapter" / "adapter_config.json").write_text("{}")
    rec = TrainConfig.minicoin(mask_storage="recompute")
    assert m.after_task(d, rec) == d / DIGEST_FILE and not (d / MASK_FILE).exists()
    (digest,) = keys.prior_digests("reglora", [d], rec)
    from data_contracts import sha256_file

    assert digest[1] == sha256_file(d / DIGEST_FILE)
    with pytest.raises(FileNotFoundError, match="mask.safetensors"):
        keys.prior_digests("reglora", [d], TrainConfig.minicoin())


# ---- two-task training runs (the tiny model, as tests/test_train.py) ------------------------------


@pytest.mark.parametrize(
    ("target", "storage"), [("a", "file"), ("delta_w", "recompute")], ids=["target-a", "recompute"]
)
def test_two_tasks_train_with_the_penalty(small_run, tmp_path, target, storage):
    from sefe_core.train import train_task

    _, bench, base = small_run
    cfg = TrainConfig.minicoin(
        max_steps=3, per_device_train_batch_size=6, save_steps=3, logging_steps=1, lora_r=4, lora_alpha=8,
        mask_storage=storage, method_settings={"reglora": {"target": target}},
    )  # fmt: skip
    d1, d2 = (tmp_path / "reglora" / f"task-{t}" for t in TASKS)
    r1 = train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d1, cfg, "reglora")
    if storage == "recompute":
        assert (d1 / DIGEST_FILE).exists() and not (d1 / MASK_FILE).exists()
        mask = recompute_task_mask(d1, target)
    else:
        assert not (d1 / DIGEST_FILE).exists()
        mask = load_mask(d1 / MASK_FILE)
    assert mask.target == target
    assert all(k.endswith("::A") for k in mask.indices) == (target == "a")
    # task 1 again at another target / storage (its train key may not change: λ and the target act
    # from task 2 on): what it keeps for later tasks follows the config, reused or not
    other = cfg.model_copy(
        update={"mask_storage": "file" if storage == "recompute" else "recompute", "method_settings": {}}
    )
    train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d1, other, "reglora")
    if storage == "recompute":
        assert load_mask(d1 / MASK_FILE).target == "delta_w"
    else:
        assert recompute_task_mask(d1, "delta_w").target == "delta_w"
    r2 = train_task(base.path, [d1], bench.task_file(TASKS[1]), bench.image_root, d2, cfg, "reglora")
    info = json.loads((d2 / "train.json").read_text())
    assert info["final_reg_penalty"] is not None and info["final_reg_penalty"] > 0
    assert r2.steps_run == 3 and r1.steps_run == 3  # step 1 has lr 0 (warmup): B moves from step 2
    # a penalty equal to a direct computation on task 2's adapter against task 1's mask
    from sefe_core.adapters import adapter_factors

    fac = [LoraFactors(n, a.double(), b.double()) for n, a, b in adapter_factors(d2 / "adapter")]
    direct = masked_regularizer(fac, [mask], target)().item()
    assert direct > 0
    if storage == "recompute":  # a changed earlier adapter: task 2 is refused, not silently re-masked
        weights = d1 / "adapter" / "adapter_model.safetensors"
        t = load_file(str(weights))
        k = next(iter(t))
        t[k] = t[k] * 1.5
        _rewrite(weights, t)
        with pytest.raises(ValueError, match="is not the adapter the mask digest"):
            REGISTRY["reglora"].penalty(_peft_for(d2), [d1], cfg)


def _peft_for(task_dir):
    """A module tree with LoRA factors of the adapter in `task_dir` (what `penalty` reads)."""
    from sefe_core.adapters import adapter_factors

    root = torch.nn.Module()
    for n, a, b in adapter_factors(task_dir / "adapter"):
        parent = root
        path = f"base_model.model.{n}".split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(a.shape[1], a.shape[0], bias=False)})
        parent.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(b.shape[1], b.shape[0], bias=False)})
    return root


def test_random_masks_of_factors_are_seeded_per_entry(tmp_path):
    _write_adapter(tmp_path)
    m1 = extract_mask(tmp_path / "adapter", 10.0, "random", seed=4, target="ab")
    m2 = extract_mask(tmp_path / "adapter", 10.0, "random", seed=4, target="ab")
    assert all(torch.equal(m1.indices[k], m2.indices[k]) for k in m1.indices)
    # the ΔW entries draw as before targets (same seed per module name)
    dw = extract_mask(tmp_path / "adapter", 10.0, "random", seed=4)
    from sefe_core.hashing import stable_seed

    n = "layers.0.q_proj"
    assert torch.equal(dw.indices[n], random_mask(SHAPES[n], 10.0, stable_seed("reglora-random", 4, n)))
