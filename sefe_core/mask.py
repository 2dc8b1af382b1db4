"""RegLoRA's masks (docs/design.md §1.2): after task k, the top M% positions of |ΔW_k| per module.

ΔW_k = B_k @ A_k (unscaled: alpha/r does not change a ranking) is formed one module at a time
and its top M% positions become mask R_k, stored as sorted int32 flat indices per module
(`mask.safetensors` in the task's directory, this task's mask only; 4 bytes per position, a
quarter of the reference's int64 (row, col) pairs). The file's metadata records the adapter's
sha256, percent, kind and seed, so a later call can tell whether it is still this adapter's mask.

The *target* (the SEFE paper's ablation) says which matrix a mask is on: `delta_w` (B @ A, the
default), `a` (A, r x in), `b` (B, out x r) or `ab` (both factors). A mask's entries are keyed by
what they index: the module name for ΔW, `<module>::A` / `<module>::B` for a factor
(`entry_name`), each with the shape of its matrix, so one code path serves every target.

With `mask_storage: recompute` a task keeps no mask file but `mask.digest.json` (the settings,
the adapter's sha256 and a sha256 per entry): a later task recomputes the mask from the adapter
(`recompute_task_mask`) and refuses one that does not match the digest.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
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
DIGEST_FILE = "mask.digest.json"
DEFAULT_TARGET = "delta_w"
# per target, the matrices of a module it masks: ΔW = B @ A, or the factors themselves
TARGET_PARTS: dict[str, tuple[str, ...]] = {
    "delta_w": ("delta_w",),
    "a": ("A",),
    "b": ("B",),
    "ab": ("A", "B"),
}


def entry_name(module: str, part: str) -> str:
    """The key of one mask entry: the module name for ΔW, `<module>::A` / `<module>::B` for a factor."""
    return module if part == "delta_w" else f"{module}::{part}"


def part_shape(a: torch.Tensor, b: torch.Tensor, part: str) -> tuple[int, int]:
    """The shape of the matrix a mask entry of `part` indexes: ΔW (out x in), A (r x in) or B (out x r)."""
    return {"delta_w": (b.shape[0], a.shape[1]), "A": tuple(a.shape), "B": tuple(b.shape)}[part]


def target_parts(target: str) -> tuple[str, ...]:
    if target not in TARGET_PARTS:
        raise ValueError(f"unknown RegLoRA target {target!r}; known: {', '.join(TARGET_PARTS)}")
    return TARGET_PARTS[target]


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
    """One task's mask: per entry (`entry_name`), sorted int32 flat indices into the matrix of
    `shapes[entry]` (ΔW of a module for target `delta_w`, a factor A or B otherwise)."""

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    percent: float
    kind: str
    target: str = DEFAULT_TARGET

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.indices.values())


def extract_mask(
    adapter_dir: str | Path,
    percent: float = 2.0,
    kind: str = "topk",
    seed: int = 0,
    device: str | torch.device | None = None,
    target: str = DEFAULT_TARGET,
) -> Mask:
    """This task's mask from its saved adapter, one module at a time (only one dense ΔW exists).

    `kind="random"` draws a random mask of the same size per entry (the `reglora-random`
    control), seeded by `seed` and the entry's name so every process draws the same one.
    `target` picks the matrices masked (`TARGET_PARTS`): ΔW = B @ A, or the factors.
    """
    if kind not in ("topk", "random"):
        raise ValueError(f"unknown mask kind {kind!r}")
    parts = target_parts(target)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    indices, shapes = {}, {}
    for name, a, b in adapter_factors(adapter_dir):
        for part in parts:
            key = entry_name(name, part)
            shape = part_shape(a, b, part)
            if kind == "topk":
                with torch.no_grad():
                    if part == "delta_w":
                        m = b.to(device, torch.float32) @ a.to(device, torch.float32)
                    else:
                        m = (a if part == "A" else b).to(device, torch.float32)
                indices[key] = topk_mask(m, percent)
                del m
            else:
                indices[key] = random_mask(shape, percent, stable_seed("reglora-random", seed, key))
            shapes[key] = shape
    return Mask(indices, shapes, percent, kind, target)


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
    if mask.target != DEFAULT_TARGET:  # absent: ΔW (a default mask's bytes are as before targets)
        meta["target"] = mask.target
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
    """The mask file's own description (percent, kind, shapes, source; `target` only when not
    ΔW), without reading tensors; None if the file is missing or not a mask file."""
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
    return Mask(indices, shapes, meta["percent"], meta["kind"], meta.get("target", DEFAULT_TARGET))


def _task_source(task_dir: Path, seed: int) -> dict[str, Any]:
    """What a task's mask is made from: its adapter's sha256 and the task's own seed."""
    from data_contracts import sha256_once  # the task's train.json hashes the same adapter

    adapter_sha = sha256_once(task_dir / ADAPTER_DIR / ADAPTER_WEIGHTS)
    return {"adapter_sha256": adapter_sha, "seed": stable_seed(seed, task_dir.name)}


def extract_task_mask(
    task_dir: str | Path, percent: float, kind: str, seed: int, target: str = DEFAULT_TARGET
) -> Path:
    """This task's own mask from its saved adapter, written atomically to `task_dir/mask.safetensors`:
    top-`percent`% of |B @ A| per module (or of the factors, `target`), or a random mask of the
    same size (`kind="random"`), seeded by `seed` and the task. An existing file made from the
    same adapter with the same settings (its metadata says) is kept, so calling it again is free."""
    task_dir = Path(task_dir)
    path = task_dir / MASK_FILE
    source = _task_source(task_dir, seed)
    meta = mask_metadata(path)
    if meta is not None:
        made = (meta["percent"], meta["kind"], meta.get("target", DEFAULT_TARGET), meta.get("source"))
        if made == (percent, kind, target, source):
            return path
    mask = extract_mask(task_dir / ADAPTER_DIR, percent, kind, seed=source["seed"], target=target)
    return save_mask(mask, path, source=source)


# ---- mask_storage: recompute -------------------------------------------------------------------


@contextmanager
def _exact_float32():
    """Full-precision float32 GEMMs while forming ΔW for a digest: TF32 (on while training with
    `train.tf32`) would make the recomputed ranking depend on which process formed it."""
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.set_float32_matmul_precision(precision)


def mask_digest(mask: Mask) -> dict[str, Any]:
    """A mask's fingerprint: sha256 over its entries' names and int32 indices in entry order, and
    per entry its size and the first 16 hex digits of its own sha256 (to name where a drift is)."""
    whole = hashlib.sha256()
    entries = {}
    for name, idx in mask.indices.items():
        raw = idx.to(torch.int32).contiguous().cpu().numpy().tobytes()
        whole.update(name.encode() + b"\0" + raw)
        entries[name] = [int(idx.numel()), hashlib.sha256(raw).hexdigest()[:16]]
    return {"sha256": whole.hexdigest(), "entries": entries}


def read_mask_digest(path: str | Path) -> dict[str, Any] | None:
    """The digest file's content; None if missing or not a SEFE mask digest."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("sefe_mask_digest") == 1 else None


def digest_task_mask(
    task_dir: str | Path, percent: float, kind: str, seed: int, target: str = DEFAULT_TARGET
) -> Path:
    """`mask_storage: recompute`: this task's mask is computed (as `extract_task_mask` would) and
    only its digest is written, to `task_dir/mask.digest.json`. An existing digest of the same
    adapter at the same settings is kept."""
    from data_contracts import write_json

    task_dir = Path(task_dir)
    path = task_dir / DIGEST_FILE
    source = _task_source(task_dir, seed)
    settings = {"percent": percent, "kind": kind, "target": target, "source": source}
    meta = read_mask_digest(path)
    if meta is not None and {k: meta.get(k) for k in settings} == settings:
        return path
    with _exact_float32():
        mask = extract_mask(task_dir / ADAPTER_DIR, percent, kind, seed=source["seed"], target=target)
    write_json(path, {"sefe_mask_digest": 1, **settings, **mask_digest(mask)})
    return path


def recompute_task_mask(
    task_dir: str | Path, target: str | None = None, device: str | torch.device | None = None
) -> Mask:
    """An earlier task's mask, recomputed from its adapter at the settings of its digest (top M%
    with the same tie rule, or the same seeded random draw) and checked against the digest.

    Raises ValueError when the digest is for another `target`, when the adapter is not the one the
    digest was made from, or when the recomputed mask differs (naming the entry and the task):
    a mask never changes silently. Recomputing on another kind of device or library version can
    order near-equal |ΔW| differently; use `mask_storage: file` where that happens."""
    from data_contracts import sha256_once

    task_dir = Path(task_dir)
    path = task_dir / DIGEST_FILE
    meta = read_mask_digest(path)
    if meta is None:
        raise FileNotFoundError(
            f"earlier task {task_dir} has no {DIGEST_FILE} (mask_storage is recompute: was its after-task "
            "step run with this storage?)"
        )
    if target is not None and meta["target"] != target:
        raise ValueError(
            f"the mask digest of earlier task {task_dir.name} is for RegLoRA target {meta['target']!r}, "
            f"the config's is {target!r} (re-run that task's after-task step with this target)"
        )
    adapter = task_dir / ADAPTER_DIR / ADAPTER_WEIGHTS
    have = sha256_once(adapter)
    if have != meta["source"]["adapter_sha256"]:
        raise ValueError(
            f"{adapter} is not the adapter the mask digest of task {task_dir.name} was made from "
            f"(sha256 {have[:12]}..., digest says {meta['source']['adapter_sha256'][:12]}...)"
        )
    with _exact_float32():
        mask = extract_mask(
            task_dir / ADAPTER_DIR,
            meta["percent"],
            meta["kind"],
            meta["source"]["seed"],
            device,
            meta["target"],
        )
    got = mask_digest(mask)
    want = meta["entries"]
    for name in [*want, *(n for n in got["entries"] if n not in want)]:
        if got["entries"].get(name) != want.get(name):
            raise ValueError(
                f"the recomputed mask of task {task_dir.name} differs from its digest at {name} "
                f"(size, sha256: {got['entries'].get(name)} vs recorded {want.get(name)}): the mask "
                "would change silently; recompute it where it was made or use mask_storage: file"
            )
    if got["sha256"] != meta["sha256"]:
        raise ValueError(f"the recomputed mask of task {task_dir.name} differs from its digest (entry order)")
    return mask
