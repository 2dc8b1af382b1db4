"""RegLoRA (DESIGN.md §1.2): the masks of earlier tasks' updates, and the regulariser that keeps a
new task's LoRA away from them.

After task k, ΔW_k = B_k @ A_k (unscaled: alpha/r does not change a ranking) is formed one module
at a time and its top M% positions by |ΔW_k| become mask R_k, stored as sorted int32 flat indices
per module (`mask.safetensors`, this task's mask only). While task k+1 trains, the loss gains

    λ · mean_over_modules( mean_{p ∈ R_1 ⊎ … ⊎ R_k} |ΔW_{k+1}[p]| )

with ⊎ a multiset union (a position chosen by several tasks counts several times). Only the new
LoRA is penalised: earlier adapters are merged into the base weights and have no parameters here.

Why it is cheap: per module, the multiset is held as `unique` int32 indices plus `extra` int32
indices (positions counted more than once, repeated), i.e. 4 bytes per multiset entry, a quarter
of the reference's int64 (row, col) pairs. ΔW is formed densely (three GEMMs per module are far
faster than gathering B rows and A columns, see BENCHMARKS.md) inside a custom autograd function
that keeps only int8 signs, so at most one module's dense ΔW (or its gradient) exists at a time.

Controls with the same budget: `reglora-random` (a random mask of the same size per module) and
`l1` (dense L1 on ΔW, same per-module mean and λ).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data_contracts import atomic_path
from sefe_core.hashing import stable_seed
from sefe_core.methods import METHODS, check_method, uses_asd  # noqa: F401 (re-exported)

MASK_FILE = "mask.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# --------------------------------------------------------------------------------------------
# Which modules get a LoRA
# --------------------------------------------------------------------------------------------
def language_model_prefix(model: torch.nn.Module) -> str:
    """Dotted name of the language model inside a Llava-class model (`model.language_model`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if module is decoder and name:
            return name
    for name, _ in model.named_modules():  # fallback for models without get_decoder
        if name.endswith("language_model"):
            return name
    raise ValueError(
        f"{type(model).__name__}: cannot find the language model (no get_decoder / language_model)"
    )


def lora_target_regex(model: torch.nn.Module) -> str:
    """A peft `target_modules` regex for every nn.Linear of the language model and nothing else.

    `"all-linear"` would also wrap the vision tower and the projector (DESIGN.md §7); the lm_head
    sits outside the language model and is excluded too, as in LLaVA's LoRA setup.
    """
    prefix = language_model_prefix(model)
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(prefix + ".")
        }
    )
    if not leaves:
        raise ValueError(f"no nn.Linear under {prefix!r}")
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})$"


@dataclass(frozen=True)
class LoraFactors:
    """The trainable factors of one LoRA module: A (r, in), B (out, r); ΔW = B @ A (unscaled)."""

    name: str  # module name in the plain (merged) model, e.g. model.language_model.layers.0.mlp.up_proj
    a: torch.Tensor
    b: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])


def lora_factors(peft_model: torch.nn.Module, adapter: str = "default") -> list[LoraFactors]:
    """The factors of `adapter` in every LoRA module of a peft model, named as in the base model."""
    out = []
    for name, module in peft_model.named_modules():
        la, lb = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(la, torch.nn.ModuleDict) and adapter in la:
            base_name = name.removeprefix("base_model.model.")
            out.append(LoraFactors(base_name, la[adapter].weight, lb[adapter].weight))
    if not out:
        raise ValueError(f"the model has no LoRA modules for adapter {adapter!r}")
    return out


def adapter_factors(adapter_dir: str | Path) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, A, B) read one module at a time from a saved peft adapter."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}")
    pattern = re.compile(r"^base_model\.model\.(.+)\.lora_A(?:\.[^.]+)?\.weight$")
    with safe_open(str(path), framework="pt") as f:
        a_keys = {m.group(1): k for k in f.keys() if (m := pattern.match(k))}
        if not a_keys:
            raise ValueError(f"{path}: no LoRA A/B weights found")
        for name in sorted(a_keys):
            a_key = a_keys[name]
            yield name, f.get_tensor(a_key), f.get_tensor(a_key.replace(".lora_A", ".lora_B"))


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def mask_size(numel: int, percent: float) -> int:
    if not 0 < percent <= 100:
        raise ValueError(f"mask percent must be in (0, 100], got {percent}")
    return max(1, round(numel * percent / 100))


def topk_mask(delta_w: torch.Tensor, percent: float) -> torch.Tensor:
    """Sorted int32 flat indices of the top `percent`% entries of |ΔW|."""
    flat = delta_w.detach().reshape(-1)
    k = mask_size(flat.numel(), percent)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    return idx.sort().values.to(torch.int32).cpu()


def random_mask(shape: tuple[int, int], percent: float, seed: int) -> torch.Tensor:
    """Sorted int32 flat indices of a uniformly random mask of the same size as a top-k mask."""
    numel = shape[0] * shape[1]
    k = mask_size(numel, percent)
    g = torch.Generator().manual_seed(seed)
    if 4 * k > numel:
        idx = torch.randperm(numel, generator=g)[:k]
    else:  # draw with replacement, de-duplicate, keep a random k: uniform, and O(k) not O(numel)
        idx = torch.empty(0, dtype=torch.long)
        while idx.numel() < k:
            draw = torch.randint(numel, (int(1.1 * (k - idx.numel())) + 16,), generator=g)
            idx = torch.unique(torch.cat([idx, draw]))
        idx = idx[torch.randperm(idx.numel(), generator=g)[:k]]
    return idx.sort().values.to(torch.int32)


@dataclass
class Mask:
    """One task's mask: per module, sorted int32 flat indices into ΔW of `shapes[module]`."""

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    percent: float
    kind: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.indices.values())


def extract_mask(
    adapter_dir: str | Path,
    percent: float = 2.0,
    kind: str = "topk",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Mask:
    """This task's mask from its saved adapter, one module at a time (only one dense ΔW exists).

    `kind="random"` draws a random mask of the same size per module (the `reglora-random`
    control), seeded by `seed` and the module name so every process draws the same one.
    """
    if kind not in ("topk", "random"):
        raise ValueError(f"unknown mask kind {kind!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    indices, shapes = {}, {}
    for name, a, b in adapter_factors(adapter_dir):
        shape = (b.shape[0], a.shape[1])
        if kind == "topk":
            with torch.no_grad():
                dw = b.to(device, torch.float32) @ a.to(device, torch.float32)
            indices[name] = topk_mask(dw, percent)
            del dw
        else:
            indices[name] = random_mask(shape, percent, stable_seed("reglora-random", seed, name))
        shapes[name] = shape
    return Mask(indices, shapes, percent, kind)


def save_mask(mask: Mask, path: str | Path, source: dict[str, Any] | None = None) -> Path:
    """`source` (e.g. the adapter's sha256 and the seed) is kept in the file's metadata, so a
    later call can tell whether the file is this adapter's mask at these settings."""
    path = Path(path)
    meta = {
        "percent": mask.percent,
        "kind": mask.kind,
        "shapes": {k: list(v) for k, v in mask.shapes.items()},
        "source": source or {},
    }
    with atomic_path(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in mask.indices.items()},
            str(tmp),
            metadata={"format": "pt", "sefe_mask": json.dumps(meta)},
        )
    return path


def mask_metadata(path: str | Path) -> dict[str, Any] | None:
    """The mask file's own description (percent, kind, shapes, source), without reading tensors;
    None if the file is missing or not a mask file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("sefe_mask", "null") or "null")
    except Exception:  # a truncated or foreign file: treat as absent, it gets rewritten
        return None


def load_mask(path: str | Path, device: str | torch.device = "cpu") -> Mask:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mask file {path} does not exist (was the earlier task finished?)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("sefe_mask", "null") or "null")
    if meta is None:
        raise ValueError(f"{path} is not a SEFE mask file (no 'sefe_mask' metadata)")
    indices = load_file(str(path), device=str(device))
    shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
    for name, idx in indices.items():
        if idx.dtype != torch.int32:
            raise ValueError(f"{path}: mask of {name} is {idx.dtype}, expected int32")
        n = shapes[name][0] * shapes[name][1]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"{path}: mask of {name} has indices outside its {shapes[name]} ΔW")
    return Mask(indices, shapes, meta["percent"], meta["kind"])


# --------------------------------------------------------------------------------------------
# The regulariser
# --------------------------------------------------------------------------------------------
@dataclass
class MultisetIndex:
    """R_1 ⊎ … ⊎ R_k of one module as `unique` positions + `extra` (each repeat once more).

    Same memory as the concatenation (4 bytes per multiset entry), but the backward scatter of
    the unique part needs no accumulation and the forward gather touches each position once.
    """

    unique: torch.Tensor  # int32, sorted
    extra: torch.Tensor  # int32, positions chosen by several tasks, repeated (count - 1) times

    @property
    def size(self) -> int:
        return self.unique.numel() + self.extra.numel()

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    @classmethod
    def union(cls, masks: Sequence[torch.Tensor]) -> MultisetIndex:
        if len(masks) == 1:
            return cls(masks[0].to(torch.int32), masks[0].new_empty(0, dtype=torch.int32))
        unique, counts = torch.unique(torch.cat(list(masks)), sorted=True, return_counts=True)
        extra = unique.repeat_interleave(counts - 1)
        return cls(unique.to(torch.int32), extra.to(torch.int32))


class _MaskedAbsSum(torch.autograd.Function):
    """sum_{p in multiset} |(B @ A)[p]|, keeping int8 signs instead of ΔW for the backward."""

    @staticmethod
    def forward(ctx, a, b, unique, extra):  # noqa: D102
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            flat = (b @ a).reshape(-1)  # the only dense ΔW alive, freed on return
            vu = flat.index_select(0, unique)
            ve = flat.index_select(0, extra)
        ctx.save_for_backward(a, b, unique, extra, vu.sign().to(torch.int8), ve.sign().to(torch.int8))
        return vu.abs().sum() + ve.abs().sum()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        a, b, unique, extra, su, se = ctx.saved_tensors
        with torch.autocast(a.device.type, enabled=False):
            g = torch.zeros(b.shape[0] * a.shape[1], dtype=a.dtype, device=a.device)
            g.index_add_(0, unique, su.to(a.dtype) * grad)
            if extra.numel():
                g.index_add_(0, extra, se.to(a.dtype) * grad)
            g = g.view(b.shape[0], a.shape[1])
            grad_a = b.t() @ g if ctx.needs_input_grad[0] else None
            grad_b = g @ a.t() if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None


class _DenseAbsSum(torch.autograd.Function):
    """sum |B @ A| over every entry; ΔW is recomputed in the backward instead of kept."""

    @staticmethod
    def forward(ctx, a, b):  # noqa: D102
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            total = (b @ a).abs().sum()
        ctx.save_for_backward(a, b)
        return total

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        a, b = ctx.saved_tensors
        with torch.autocast(a.device.type, enabled=False):
            g = (b @ a).sign_().mul_(grad)
            grad_a = b.t() @ g if ctx.needs_input_grad[0] else None
            grad_b = g @ a.t() if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def masked_abs_mean(a: torch.Tensor, b: torch.Tensor, index: MultisetIndex) -> torch.Tensor:
    """mean_{p in multiset} |(B @ A)[p]| of one module."""
    return _MaskedAbsSum.apply(a, b, index.unique, index.extra) / index.size


def dense_abs_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean |B @ A| over all entries of one module (the `l1` control)."""
    return _DenseAbsSum.apply(a, b) / (b.shape[0] * a.shape[1])


class Regularizer:
    """The RegLoRA penalty (without λ) of the new LoRA: mean over modules of each module's term.

    `index[name]` is the multiset of earlier masks for the masked kinds, None for dense `l1`.
    """

    def __init__(self, factors: Sequence[LoraFactors], index: dict[str, MultisetIndex] | None):
        self.factors = list(factors)
        self.index = index
        for f in self.factors:
            if f.a.numel() == 0 or f.b.numel() == 0:
                raise RuntimeError(
                    f"LoRA factors of {f.name} are empty here (partitioned by DeepSpeed ZeRO-3?); "
                    "keep them whole with stage3_param_persistence_threshold (see configs/zero3.json)"
                )
        if index is not None:
            missing = [f.name for f in self.factors if f.name not in index]
            if missing:
                raise ValueError(f"earlier masks do not cover the new LoRA modules, e.g. {missing[:3]}")

    @property
    def mask_nbytes(self) -> int:
        return sum(ix.nbytes for ix in (self.index or {}).values())

    def __call__(self) -> torch.Tensor:
        terms = []
        for f in self.factors:
            if self.index is None:
                terms.append(dense_abs_mean(f.a, f.b))
            else:
                terms.append(masked_abs_mean(f.a, f.b, self.index[f.name]))
        return torch.stack(terms).mean()


def build_regularizer(
    peft_model: torch.nn.Module,
    method: str,
    prior_masks: Sequence[str | Path | Mask],
    adapter: str = "default",
) -> Regularizer | None:
    """The penalty of `method` for the new LoRA given the earlier tasks' masks (None: no penalty).

    No penalty on the first task (nothing to protect yet), for every method.
    """
    penalty, _ = check_method(method)
    if penalty == "none" or not prior_masks:
        return None
    factors = lora_factors(peft_model, adapter)
    if penalty == "l1":
        return Regularizer(factors, None)
    device = factors[0].a.device
    masks = [m if isinstance(m, Mask) else load_mask(m, device) for m in prior_masks]
    index = {}
    for f in factors:
        per_task = []
        for i, m in enumerate(masks):
            if f.name not in m.indices:
                raise ValueError(f"mask of earlier task {i + 1} has no module {f.name}")
            if tuple(m.shapes[f.name]) != f.shape:
                raise ValueError(f"mask of {f.name} is for shape {m.shapes[f.name]}, LoRA ΔW is {f.shape}")
            per_task.append(m.indices[f.name].to(device))
        index[f.name] = MultisetIndex.union(per_task)
    return Regularizer(factors, index)


def pairs_nbytes(n_entries: int) -> int:
    """Bytes of the reference implementation's int64 (row, col) pairs for `n_entries` positions."""
    return 16 * n_entries


def reference_penalty(factors: Sequence[LoraFactors], pairs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference implementation's formulation, kept for tests and the benchmark: dense ΔW per
    module gathered with int64 (row, col) pairs of all earlier masks concatenated, plain autograd."""
    terms = []
    for f in factors:
        rc = pairs[f.name]
        terms.append((f.b @ f.a)[rc[:, 0], rc[:, 1]].abs().mean())
    return torch.stack(terms).mean()


def as_pairs(flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """int32 flat indices -> int64 (row, col) pairs, the reference implementation's mask layout."""
    flat = flat.long()
    return torch.stack([flat // shape[1], flat % shape[1]], dim=1)


__all__ = [
    "MASK_FILE",
    "METHODS",
    "Mask",
    "MultisetIndex",
    "Regularizer",
    "as_pairs",
    "build_regularizer",
    "check_method",
    "dense_abs_mean",
    "extract_mask",
    "load_mask",
    "lora_factors",
    "lora_target_regex",
    "mask_size",
    "masked_abs_mean",
    "pairs_nbytes",
    "random_mask",
    "reference_penalty",
    "save_mask",
    "topk_mask",
]
