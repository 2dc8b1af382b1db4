"""The penalties on a new task's LoRA (docs/design.md §1.2), as differentiable terms the
continual methods (sefe_core/methods/) combine:

    masked:  mean_{p ∈ R_1 ⊎ … ⊎ R_k} |ΔW_new[p]|   (RegLoRA; ⊎ a multiset union: a position
             chosen by several tasks counts several times)
    dense:   mean_p |ΔW_new[p]|                       (the `l1` control, same scale and λ)

Only the new LoRA is penalised: earlier adapters are merged into the base weights and have no
parameters here. ΔW is formed densely (three GEMMs per module are far faster than gathering B
rows and A columns, see BENCHMARKS.md) inside a custom autograd function that keeps only int8
signs, so at most one module's dense ΔW (or its gradient) exists at a time. Per module, the
multiset is held as `unique` int32 indices plus `extra` int32 indices (positions counted more
than once, repeated): 4 bytes per multiset entry.

The masks' *target* (sefe_core/mask.py) decides what is penalised: ΔW (the default, above), or
the factors themselves, `mean_{p ∈ multiset} |A_new[p]|` (resp. B; plain autograd, they exist
anyway), with target `ab` a module's term the mean of its A and B terms. The index is keyed
by mask entry (`mask.entry_name`), so every target goes through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sefe_core.adapters import LoraFactors
from sefe_core.mask import DEFAULT_TARGET, Mask, entry_name, load_mask, part_shape, target_parts


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


def factor_abs_mean(t: torch.Tensor, index: MultisetIndex) -> torch.Tensor:
    """mean_{p in multiset} |t[p]| of one factor (A or B) of a module, plain autograd."""
    flat = t.reshape(-1)
    total = flat.index_select(0, index.unique).abs().sum()
    if index.extra.numel():
        total = total + flat.index_select(0, index.extra).abs().sum()
    return total / index.size


def dense_abs_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean |B @ A| over all entries of one module (the `l1` control)."""
    return _DenseAbsSum.apply(a, b) / (b.shape[0] * a.shape[1])


class Regularizer:
    """The RegLoRA penalty (without λ) of the new LoRA: mean over modules of each module's term.

    `index[entry]` is the multiset of earlier masks per mask entry (`mask.entry_name`: the module
    for ΔW, `<module>::A` / `::B` for a factor of `target`), None for dense `l1` on ΔW.
    """

    def __init__(
        self,
        factors: Sequence[LoraFactors],
        index: dict[str, MultisetIndex] | None,
        target: str = DEFAULT_TARGET,
    ):
        self.factors = list(factors)
        self.index = index
        self.parts = target_parts(target)
        self.target = target
        for f in self.factors:
            if f.a.numel() == 0 or f.b.numel() == 0:
                raise RuntimeError(
                    f"LoRA factors of {f.name} are empty here (partitioned by DeepSpeed ZeRO-3?); "
                    "keep them whole with stage3_param_persistence_threshold (see configs/zero3.json)"
                )
        if index is not None:
            missing = [
                e for f in self.factors for p in self.parts if (e := entry_name(f.name, p)) not in index
            ]
            if missing:
                raise ValueError(f"earlier masks do not cover the new LoRA modules, e.g. {missing[:3]}")

    @property
    def mask_nbytes(self) -> int:
        return sum(ix.nbytes for ix in (self.index or {}).values())

    def _term(self, f: LoraFactors, part: str) -> torch.Tensor:
        ix = self.index[entry_name(f.name, part)]
        if part == "delta_w":
            return masked_abs_mean(f.a, f.b, ix)
        return factor_abs_mean(f.a if part == "A" else f.b, ix)

    def __call__(self) -> torch.Tensor:
        terms = []
        for f in self.factors:
            if self.index is None:
                terms.append(dense_abs_mean(f.a, f.b))
            elif len(self.parts) == 1:
                terms.append(self._term(f, self.parts[0]))
            else:  # `ab`: the module's term is the mean of its factors' terms
                terms.append(torch.stack([self._term(f, p) for p in self.parts]).mean())
        return torch.stack(terms).mean()


def masked_regularizer(
    factors: Sequence[LoraFactors], masks: Sequence[Mask | str], target: str | None = None
) -> Regularizer:
    """RegLoRA's penalty of the new LoRA against the earlier tasks' masks (files or Masks).

    `target`: the config's (ValueError if an earlier mask was made for another one); None takes
    the masks' own target (which must then agree)."""
    device = factors[0].a.device
    loaded = [m if isinstance(m, Mask) else load_mask(m, device) for m in masks]
    where = [
        f"earlier task {i + 1}" + ("" if isinstance(m, Mask) else f" ({m})") for i, m in enumerate(masks)
    ]
    target = target if target is not None else (loaded[0].target if loaded else DEFAULT_TARGET)
    for w, m in zip(where, loaded, strict=True):
        if m.target != target:
            raise ValueError(
                f"the mask of {w} is for RegLoRA target {m.target!r}, the config's is {target!r} "
                "(re-run that task's after-task step with this target)"
            )
    index = {}
    for f in factors:
        for part in target_parts(target):
            key, shape = entry_name(f.name, part), part_shape(f.a, f.b, part)
            per_task = []
            for w, m in zip(where, loaded, strict=True):
                if key not in m.indices:
                    raise ValueError(f"the mask of {w} has no entry {key}")
                if tuple(m.shapes[key]) != shape:
                    raise ValueError(
                        f"the mask of {key} ({w}) is for shape {tuple(m.shapes[key])}, the LoRA's is {shape}"
                    )
                per_task.append(m.indices[key].to(device))
            index[key] = MultisetIndex.union(per_task)
    return Regularizer(factors, index, target)


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
