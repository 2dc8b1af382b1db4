"""RegLoRA's masks (docs/design.md §1.2): after task k, the top M% positions of |ΔW_k| per module.

ΔW_k = B_k @ A_k (unscaled: alpha/r does not change a ranking) is formed one module at a time
and its top M% positions become mask R_k, stored as sorted int32 flat indices per module
(`mask.safetensors` in the task's directory, this task's mask only; 4 bytes per position, a
quarter of the reference's int64 (row, col) pairs). The file's metadata records the adapter's
sha256, percent, kind and seed, so a later call can tell whether it is still this adapter's mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data_contracts import atomic_path
from sefe_core.adapters import ADAPTER_DIR, ADAPTER_WEIGHTS, adapter_factors
from sefe_core.hashing import stable_seed

MASK_FILE = "mask.safetensors"


def mask_size(numel: int, percent: float) -> int:
    if not 0 < percent <= 100:
        raise ValueError(f"mask percent must be in (0, 100], got {percent}")
    return max(1, round(numel * percent / 100))


def topk_mask(delta_w: torch.Tensor, percent: float) -> torch.Tensor:
    """Sorted int32 flat indices of the top `percent`% entries of |ΔW|. Ties at the k-th value
    go to the lowest indices: `torch.topk` picks among equal values arbitrarily (it gave two
    different masks of one adapter in one process, e.g. where rows of B are still zero), and a
    mask must be a function of its adapter."""
    magnitude = delta_w.detach().reshape(-1).abs()
    k = mask_size(magnitude.numel(), percent)
    kth = torch.topk(magnitude, k, sorted=False).values.min()
    above = (magnitude > kth).nonzero().squeeze(1)
    ties = (magnitude == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values.to(torch.int32).cpu()


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
            # one metadata entry: safetensors writes several in a per-process random order, so the
            # same mask got another sha256 in another process (and the tasks after it retrained)
            metadata={"sefe_mask": json.dumps(meta)},
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


def extract_task_mask(task_dir: str | Path, percent: float, kind: str, seed: int) -> Path:
    """This task's own mask from its saved adapter, written atomically to `task_dir/mask.safetensors`:
    top-`percent`% of |B @ A| per module, or a random mask of the same size (`kind="random"`),
    seeded by `seed` and the task. An existing file made from the same adapter with the same
    settings (its metadata says) is kept, so calling it again is free."""
    from data_contracts import sha256_once  # the task's train.json hashes the same adapter

    task_dir = Path(task_dir)
    path = task_dir / MASK_FILE
    seed = stable_seed(seed, task_dir.name)
    source = {"adapter_sha256": sha256_once(task_dir / ADAPTER_DIR / ADAPTER_WEIGHTS), "seed": seed}
    meta = mask_metadata(path)
    if meta is not None and (meta["percent"], meta["kind"], meta.get("source")) == (percent, kind, source):
        return path
    return save_mask(extract_mask(task_dir / ADAPTER_DIR, percent, kind, seed=seed), path, source=source)
