"""RegLoRA mask storage at LLaVA-1.5-7B shapes: `file` (mask.safetensors) vs `recompute`
(mask.digest.json, the mask recomputed from the adapter when a later task needs it), issue 17.

Assumed shapes (those of bench/bench_reglora.py and docs/design.md §1.2: LoRA on every linear
layer of the language model): 32 decoder layers x {q,k,v,o 4096x4096; gate,up 11008x4096;
down 4096x11008} (out x in) = 224 modules, r=128, M=2%; the merged checkpoint LLaVA-1.5-7B in
fp16 (7.06e9 parameters).

* disk per task: `mask.safetensors` bytes (exact int32 data + its header, written for the real
  224 entry names and sizes) vs `mask.digest.json` bytes (written for the same entries);
* recompute time: a real adapter file (random fp32 A/B, peft's default adapter dtype) holding
  `--per-shape` modules of each of the three module shapes; `recompute_task_mask` (read, ΔW = B @ A
  per module, top 2% with the tie rule, digest check) is timed `--repeats` times per shape and
  extrapolated to 224 modules (128 q-shaped, 64 gate-shaped, 32 down-shaped), plus the sha256 of
  a 7B adapter file (hashed once per process, extrapolated from the subset file's rate);
* the four targets (optional, `--targets-shape`): entries per task at 7B shapes (exact) and the
  regulariser's forward+backward per step on one small layer.

    python bench/bench_mask_storage.py                   # 1 module per shape, 3 repeats
    python bench/bench_mask_storage.py --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.common import (  # noqa: E402
    LAYERS_7B,
    LLAVA_7B_PARAMS,
    MODULES_7B,
    load_average,
    machine,
    publish,
    utc_heading,
)
from data_contracts import sha256_file  # noqa: E402
from sefe_core.adapters import LoraFactors  # noqa: E402
from sefe_core.mask import (  # noqa: E402
    DIGEST_FILE,
    MASK_FILE,
    Mask,
    digest_task_mask,
    entry_name,
    mask_size,
    random_mask,
    recompute_task_mask,
    save_mask,
    target_parts,
)
from sefe_core.regularizer import masked_regularizer  # noqa: E402

SECTION = "## Mask storage: file vs recompute (issue 17)"
SHAPE_OF = {"q-like 4096x4096": "self_attn.q_proj", "gate-like 11008x4096": "mlp.gate_proj",
            "down 4096x11008": "mlp.down_proj"}  # fmt: skip


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def module_names() -> list[tuple[str, tuple[int, int]]]:
    return [
        (f"model.language_model.layers.{i}.{m}", s) for i in range(LAYERS_7B) for m, s in MODULES_7B.items()
    ]


def disk_per_task(percent: float, r: int, target: str = "delta_w") -> tuple[int, int, int]:
    """(mask.safetensors bytes, mask.digest.json bytes, entries) of one 7B task: the file's data
    exactly (4 bytes per entry) and its header as safetensors builds it (JSON of dtype, shape and
    offsets per tensor + our metadata), without writing hundreds of MB; the digest as
    `digest_task_mask` writes it (its hex digests have a fixed width)."""
    entries: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for name, (o, i) in module_names():
        for part in target_parts(target):
            rows, cols = {"delta_w": (o, i), "A": (r, i), "B": (o, r)}[part]
            entries[entry_name(name, part)] = mask_size(rows * cols, percent)
            shapes[entry_name(name, part)] = [rows, cols]
    data = 4 * sum(entries.values())
    offsets, pos = {}, 0
    for k, n in entries.items():
        offsets[k] = (pos, pos + 4 * n)
        pos += 4 * n
    meta = {"percent": percent, "kind": "topk", "shapes": shapes,
            "source": {"adapter_sha256": "0" * 64, "seed": 2**62}}  # fmt: skip
    header = {k: {"dtype": "I32", "shape": [n], "data_offsets": list(offsets[k])} for k, n in entries.items()}
    header["__metadata__"] = {"sefe_mask": json.dumps(meta)}
    head = json.dumps(header, separators=(",", ":")).encode()
    file_bytes = 8 + len(head) + (-len(head)) % 8 + data
    digest = {"sefe_mask_digest": 1, "percent": percent, "kind": "topk", "target": target,
              "source": meta["source"], "sha256": "0" * 64,
              "entries": {k: [n, "0" * 16] for k, n in entries.items()}}  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        from data_contracts import write_json

        write_json(Path(d) / DIGEST_FILE, digest)
        digest_bytes = (Path(d) / DIGEST_FILE).stat().st_size
    return file_bytes, digest_bytes, sum(entries.values())


def write_adapter(task_dir: Path, modules: list[tuple[str, tuple[int, int]]], r: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (o, i) in modules:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, i, generator=g) / i**0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
    (task_dir / "adapter").mkdir(parents=True)
    path = task_dir / "adapter" / "adapter_model.safetensors"
    save_file(tensors, str(path))
    (task_dir / "adapter" / "adapter_config.json").write_text("{}")
    return path


def time_targets(
    shape_scale: int, r: int, percent: float, tasks: int, repeats: int
) -> dict[str, tuple[float, int]]:
    """Per target: (median fwd+bwd seconds of the penalty of one layer at shapes / shape_scale,
    multiset entries), against `tasks` earlier random masks."""
    mods = [(f"layers.0.{m}", (o // shape_scale, i // shape_scale)) for m, (o, i) in MODULES_7B.items()]
    g = torch.Generator().manual_seed(0)
    factors = [
        LoraFactors(n, (torch.randn(r, i, generator=g) / i**0.5).requires_grad_(),
                    (torch.randn(o, r, generator=g) * 0.01).requires_grad_())
        for n, (o, i) in mods
    ]  # fmt: skip
    out = {}
    for target in ("delta_w", "a", "b", "ab"):
        masks = []
        for t in range(tasks):
            idx, shapes = {}, {}
            for j, f in enumerate(factors):
                for part in target_parts(target):
                    key = entry_name(f.name, part)
                    shapes[key] = {"delta_w": f.shape, "A": tuple(f.a.shape), "B": tuple(f.b.shape)}[part]
                    idx[key] = random_mask(shapes[key], percent, seed=1000 * t + 10 * j + len(part))
            masks.append(Mask(idx, shapes, percent, "random", target))
        reg = masked_regularizer(factors, masks, target)
        ts = []
        for _ in range(repeats):
            for f in factors:
                f.a.grad = f.b.grad = None
            t0 = time.perf_counter()
            reg().backward()
            ts.append(time.perf_counter() - t0)
        out[target] = (statistics.median(ts), sum(ix.size for ix in reg.index.values()))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--percent", type=float, default=2.0)
    p.add_argument("--per-shape", type=int, default=1, help="modules of each shape in the timed adapter")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--targets-shape", type=int, default=4, help="targets' timing at 7B shapes / this (0: skip)"
    )
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from bench.common import command_line

    command, load_before = command_line(), load_average()

    file_bytes, digest_bytes, entries = disk_per_task(args.percent, args.r)
    merged = LLAVA_7B_PARAMS * 2

    per_shape: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, mod in SHAPE_OF.items():
            d = Path(tmp) / label.split()[0] / "task-01"
            mods = [
                (f"model.language_model.layers.{i}.{mod}", MODULES_7B[mod]) for i in range(args.per_shape)
            ]
            weights = write_adapter(d, mods, args.r, seed=len(per_shape))
            t0 = time.perf_counter()
            sha256_file(weights)
            sha_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            digest_task_mask(d, args.percent, "topk", 0)  # after_task with mask_storage: recompute
            make_s = time.perf_counter() - t0
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                recompute_task_mask(d, "delta_w", "cpu")
                ts.append(time.perf_counter() - t0)
                print(f"{label}: recompute {ts[-1]:.2f} s for {args.per_shape} module(s)", flush=True)
            # the file path's cost for the same modules: write + load of mask.safetensors
            mask = recompute_task_mask(d, "delta_w", "cpu")
            t0 = time.perf_counter()
            save_mask(mask, d / MASK_FILE)
            from sefe_core.mask import load_mask

            load_mask(d / MASK_FILE)
            io_s = time.perf_counter() - t0
            per_shape[label] = {
                "recompute": statistics.median(ts) / args.per_shape,
                "raw": ts,
                "make": make_s / args.per_shape,
                "io": io_s / args.per_shape,
                "sha_rate": weights.stat().st_size / sha_s,
                "adapter_bytes": weights.stat().st_size / args.per_shape,
            }
    counts = {
        "q-like 4096x4096": 4 * LAYERS_7B,
        "gate-like 11008x4096": 2 * LAYERS_7B,
        "down 4096x11008": LAYERS_7B,
    }
    recompute_7b = sum(per_shape[k]["recompute"] * n for k, n in counts.items())
    io_7b = sum(per_shape[k]["io"] * n for k, n in counts.items())
    adapter_7b = sum(per_shape[k]["adapter_bytes"] * n for k, n in counts.items())
    sha_rate = statistics.median(v["sha_rate"] for v in per_shape.values())

    targets = {}
    if args.targets_shape:
        targets = time_targets(
            args.targets_shape, args.r // args.targets_shape, args.percent, 3, args.repeats
        )
    target_disk = {t: disk_per_task(args.percent, args.r, t) for t in ("delta_w", "a", "b", "ab")}

    lines = [
        "",
        utc_heading(),
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}, CPU; load average before: {load_before}, after: {load_average()}  ",
        f"Assumed: LLaVA-1.5-7B, LoRA r={args.r} on q,k,v,o,gate,up,down of all {LAYERS_7B} decoder layers "
        f"(224 modules), M={args.percent}%, merged checkpoint fp16 {human(merged)}. Disk figures exact "
        "(files built for the real 224 entry names and sizes); recompute timed on a real adapter file of "
        f"{args.per_shape} module(s) per shape (random fp32 A/B), median of {args.repeats}, and "
        "**extrapolated** linearly to 224 modules (128 q-like, 64 gate-like, 32 down).",
        "",
        "| per task | `file` (mask.safetensors) | `recompute` (mask.digest.json) |",
        "| --- | --- | --- |",
        f"| on disk | {human(file_bytes)} ({file_bytes / merged:.4f} of the merged checkpoint) | "
        f"{human(digest_bytes)} ({digest_bytes / merged:.1e}) |",
        f"| a later task reads it (224 modules) | load ≈ {io_7b:.1f} s (save + load measured) | "
        f"recompute + check ≈ {recompute_7b:.0f} s (extrapolated) + sha256 of the "
        f"{human(adapter_7b)} adapter ≈ {adapter_7b / sha_rate:.1f} s once per process |",
        "",
        f"One task's mask: {entries:,} entries (4 bytes each). Recompute per module (median, CPU): "
        + "; ".join(
            f"{k} {v['recompute']:.2f} s (raw {[round(t, 2) for t in v['raw']]}, digest written in "
            f"{v['make']:.2f} s)"
            for k, v in per_shape.items()
        )
        + f". Training task k with `recompute` recomputes k-1 masks at its start (and again on a resume): "
        f"≈ {recompute_7b / 60:.1f} min per earlier task on this CPU, i.e. "
        f"{7 * recompute_7b / 60:.0f} min of CPU at task 8; on the training GPU the GEMMs and top-k "
        "are far cheaper (not measured here: no GPU in this session).",
    ]
    if targets:
        lines += [
            "",
            "The four targets (`train.method_settings.reglora.target`): one task's mask at 7B shapes "
            f"(exact), and the penalty's forward+backward per step on one layer at 7B shapes / "
            f"{args.targets_shape} (r={args.r // args.targets_shape}, 3 earlier random masks, median of "
            f"{args.repeats}):",
            "",
            "| target | entries per task (7B) | mask.safetensors per task (7B) | multiset entries (small layer) "
            "| fwd+bwd (small layer) |",
            "| --- | --- | --- | --- | --- |",
            *[
                f"| {t} | {target_disk[t][2]:,} | {human(target_disk[t][0])} | {targets[t][1]:,} | "
                f"{targets[t][0] * 1000:.1f} ms |"
                for t in ("delta_w", "a", "b", "ab")
            ],
        ]
    entry = "\n".join(lines)
    publish(entry, SECTION, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
