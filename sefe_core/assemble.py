"""A llava-hf LLaVA-1.5 directory assembled from the three parts the reference starts from.

CoIN (and so SEFE) starts every run from lmsys/vicuna-7b-v1.5, openai/clip-vit-large-patch14-336
and the LLaVA-1.5 pre-training projector `mm_projector.bin`
(liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5), not from the instruction-tuned
llava-1.5-7b. `assemble_llava` writes those parts as one `LlavaForConditionalGeneration`
directory (safetensors, config, tokenizer, processor, chat template) that `vlm.load_vlm` loads
with no remote code, so the rest of the pipeline takes the same path as for the tiny model or a
llava-hf checkpoint.

Every `.bin` is read with `torch.load(weights_only=True)`: a checkpoint that would need to
unpickle anything but tensors is refused, never executed.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file as load_safetensors
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from data_contracts import atomic_path, write_json
from sefe_core.vlm import save_vlm

log = logging.getLogger(__name__)

# LLaVA-1.5 settings (scripts/v1_5/finetune.sh of the reference, the same in CoIN's scripts):
# --mm_vision_select_layer -2, --mm_projector_type mlp2x_gelu, patch features without CLS.
VISION_FEATURE_LAYER = -2
VISION_FEATURE_SELECT_STRATEGY = "default"
PROJECTOR_HIDDEN_ACT = "gelu"
PAD_TOKEN = "<pad>"
# llava-hf pads the vocabulary to a multiple of 64 (32000 + <image> + <pad> -> 32064).
VOCAB_PAD_MULTIPLE = 64
# conv_vicuna_v1 of LLaVA's llava/conversation.py: what `--version v1` trains and
# `--conv-mode vicuna_v1` evaluates with (CoIN's scripts use both).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ASSEMBLY_INFO = "assembly.json"

# Checkpoint files of a HF directory, in order of preference (safetensors first: no pickle at all).
_WEIGHT_FILES = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)
# Buffers older checkpoints saved that current modules recompute (never weights).
_DROPPED_SUFFIXES = (".inv_freq", ".position_ids")


class AssemblyError(ValueError):
    """The parts cannot form a LLaVA-1.5 model (missing files, wrong keys, mismatched sizes)."""


class UnsafeCheckpointError(AssemblyError):
    """A `.bin` file holds pickled objects other than tensors; loading it could run code."""


# --------------------------------------------------------------------------------------------
# Safe reading of the published formats
# --------------------------------------------------------------------------------------------
def _reason(e: Exception) -> str:
    """The line of torch's weights_only error that names the offending global, without colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    hits = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (hits or [ln for ln in lines if ln] or [type(e).__name__])[0]


def load_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a `.safetensors` or torch.save'd `.bin` file.

    `.bin` goes through `torch.load(weights_only=True)`, memory-mapped so a 10 GB shard is not
    read into RAM at once; a pickle with anything but tensors and plain containers is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise AssemblyError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (pre-zipfile) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors, and "
            f"unpickling them could execute code (torch.load weights_only=True: {_reason(e)})"
        ) from e
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise AssemblyError(f"{path} is not a flat state dict of tensors (got {type(obj).__name__})")
    return obj


def load_hf_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a HF model directory: sharded or single, safetensors preferred over `.bin`.

    A shard index maps every key to its file; missing shards or keys absent from their shard are
    errors, so a half-downloaded model is caught here and not as random weights later.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AssemblyError(f"model directory not found: {model_dir}")
    for name, is_index in _WEIGHT_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if not is_index:
            return load_tensor_file(path)
        weight_map: dict[str, str] = json.loads(path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise AssemblyError(f"{model_dir}: shards missing (listed in {name}): {', '.join(missing)}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_tensor_file(model_dir / f))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise AssemblyError(
                f"{model_dir}: {len(absent)} keys of {name} not in their shards, e.g. {absent[:3]}"
            )
        return state
    wanted = ", ".join(n for n, _ in _WEIGHT_FILES)
    raise AssemblyError(f"{model_dir}: no weights found (looked for {wanted})")


def load_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """The mlp2x_gelu projector of an LLaVA pre-training run as {linear_1,linear_2}.{weight,bias}.

    The reference saves `model.named_parameters()` entries containing "mm_projector"
    (`model.mm_projector.0.weight`, ...) and loads them back by the suffix after "mm_projector."
    (llava_arch.py); index 0 and 2 are the two Linear layers around the GELU.
    """
    state = load_tensor_file(path)
    sub = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not sub:
        raise AssemblyError(f"{path}: no mm_projector.* keys (found {sorted(state)[:5]})")
    ignored = sorted(k for k in state if "mm_projector." not in k)
    if ignored:
        log.warning("%s: ignoring non-projector keys %s", path, ignored[:5])
    expected = {"0.weight", "0.bias", "2.weight", "2.bias"}
    if set(sub) != expected:
        raise AssemblyError(
            f"{path}: expected an mlp2x_gelu projector with keys {sorted(expected)} after "
            f"'mm_projector.', got {sorted(sub)}"
        )
    return {
        "linear_1.weight": sub["0.weight"],
        "linear_1.bias": sub["0.bias"],
        "linear_2.weight": sub["2.weight"],
        "linear_2.bias": sub["2.bias"],
    }


# --------------------------------------------------------------------------------------------
# Key mapping onto transformers 5's LlavaForConditionalGeneration
# --------------------------------------------------------------------------------------------
def _droppable(key: str) -> bool:
    return key.endswith(_DROPPED_SUFFIXES)


def map_llm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM keys (`model.*`, `lm_head.*`) -> `model.language_model.*`, `lm_head.*`."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if _droppable(k):
            continue
        if k.startswith("model."):
            out["model.language_model." + k.removeprefix("model.")] = v
        elif k.startswith("lm_head."):
            out[k] = v
        else:
            raise AssemblyError(f"unexpected key in the language model checkpoint: {k}")
    if "lm_head.weight" not in out and "model.language_model.embed_tokens.weight" in out:
        # tied checkpoints omit the head (as the HF conversion does, clone the embeddings)
        out["lm_head.weight"] = out["model.language_model.embed_tokens.weight"].clone()
    return out


def map_vision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP `vision_model.*` -> `model.vision_tower.*`; the text tower and both contrastive
    projections are dropped (LLaVA uses the vision encoder's hidden states only).

    transformers 5's CLIPVisionModel has no `vision_model.` level at run time (a PrefixChange in
    its conversion mapping); `save_pretrained` writes whatever its on-disk form is.
    """
    out = {
        "model.vision_tower." + k.removeprefix("vision_model."): v
        for k, v in state.items()
        if k.startswith("vision_model.") and not _droppable(k)
    }
    if not out:
        raise AssemblyError("no vision_model.* keys in the vision checkpoint (not a CLIP model?)")
    return out


def _resize_vocab(
    state: dict[str, torch.Tensor], new_rows: int, new_ids: Iterable[int]
) -> dict[str, torch.Tensor]:
    """Grow embeddings and head to `new_rows`; rows past the old size and rows of newly added
    tokens get the mean of the old rows (LLaVA's `initialize_vision_tokenizer` does this; the HF
    conversion samples around the same mean with 1e-5 of the covariance)."""
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        old = state[key]
        n_old = old.shape[0]
        new = torch.empty((max(new_rows, n_old), old.shape[1]), dtype=old.dtype)
        new[:n_old] = old
        mean = old.float().mean(dim=0).to(old.dtype)
        new[n_old:] = mean
        for i in new_ids:
            new[i] = mean
        state[key] = new
    return state


# --------------------------------------------------------------------------------------------
# Tokenizer, processor, chat template
# --------------------------------------------------------------------------------------------
def llava_chat_template(image_token: str = "<image>", system: str = VICUNA_V1_SYSTEM) -> str:
    """LLaVA-1.5's vicuna_v1 conversation (SeparatorStyle.TWO) as a jinja chat template.

    `system USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ...`; a leading system
    message replaces the default system prompt. Images come first in a user turn, as the
    reference moves `<image>` to the front of the first question.
    """
    image = json.dumps(image_token + "\n")
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] is string -%}{%- set sys_msg = messages[0]['content'] -%}"
        "{%- else -%}{%- set sys_msg = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join(' ') -%}{%- endif -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        f"{{%- set sys_msg = {json.dumps(system)} -%}}"
        "{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{{- sys_msg + ' ' -}}"
        "{%- for message in loop_messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set text = message['content'] -%}{%- set n_img = 0 -%}"
        "{%- else -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join(' ') -%}"
        "{%- set n_img = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{- 'USER: ' + {image} * n_img + text + ' ' -}}}}"
        "{%- else -%}"
        "{{- 'ASSISTANT: ' + text + '</s>' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def _add_tokens(tok: PreTrainedTokenizerBase, image_token: str) -> list[int]:
    """Add the image token and a `<pad>` pad token as llava-hf does; return the ids added."""
    before = len(tok)
    tok.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token != PAD_TOKEN:  # Vicuna pads with <unk>; llava-hf gives <pad> its own id
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return list(range(before, len(tok)))


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------
def _weight_files(d: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in sorted(d.iterdir())
        if p.is_file() and p.suffix in {".bin", ".safetensors", ".json", ".model"}
    }


def _provenance(
    llm: Path, vision: Path, projector: Path, dtype: torch.dtype | None, image_token: str
) -> dict[str, Any]:
    """What identifies an assembly cheaply (paths, file names and sizes, settings): a rerun with
    the same inputs reuses the directory instead of reading 14 GB again."""
    return {
        "llm": {"path": str(llm.resolve()), "files": _weight_files(llm)},
        "vision": {"path": str(vision.resolve()), "files": _weight_files(vision)},
        "projector": {"path": str(projector.resolve()), "bytes": projector.stat().st_size},
        "dtype": str(dtype) if dtype is not None else None,
        "image_token": image_token,
        "vision_feature_layer": VISION_FEATURE_LAYER,
        "vision_feature_select_strategy": VISION_FEATURE_SELECT_STRATEGY,
        "builder_version": 1,
    }


def assemble_llava(
    llm: str | Path,
    vision: str | Path,
    projector: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    image_token: str = "<image>",
) -> Path:
    """Write a llava-hf LLaVA-1.5 directory at `out` from its published parts; return `out`.

    llm: a HF Llama directory (config, tokenizer, `pytorch_model*.bin` or `*.safetensors`).
    vision: a HF CLIP directory (CLIPModel or CLIPVisionModel weights, preprocessor_config.json).
    projector: LLaVA's `mm_projector.bin` (mlp2x_gelu). dtype: of every weight; default the
    LLM's. The directory appears atomically; if it exists from the same inputs it is reused,
    otherwise an existing `out` is an error.
    """
    llm, vision, projector, out = Path(llm), Path(vision), Path(projector), Path(out)
    for p, what in ((llm, "language model directory"), (vision, "vision model directory")):
        if not p.is_dir():
            raise AssemblyError(f"{what} not found: {p}")
    if not projector.is_file():
        raise AssemblyError(f"projector file not found: {projector}")
    info = _provenance(llm, vision, projector, dtype, image_token)
    if out.exists():
        prev = out / ASSEMBLY_INFO
        if prev.is_file() and json.loads(prev.read_text()).get("inputs") == info:
            log.info("reusing %s (assembled from the same parts)", out)
            return out
        raise FileExistsError(f"{out} exists and was not assembled from these parts; remove it first")

    text_config = AutoConfig.from_pretrained(llm)
    vision_config = CLIPVisionConfig.from_pretrained(vision)
    proj = load_projector(projector)
    p_in, p_out = proj["linear_1.weight"].shape[1], proj["linear_2.weight"].shape[0]
    if p_in != vision_config.hidden_size:
        raise AssemblyError(
            f"projector input dim {p_in} != vision hidden size {vision_config.hidden_size} ({vision})"
        )
    if p_out != text_config.hidden_size:
        raise AssemblyError(
            f"projector output dim {p_out} != language model hidden size {text_config.hidden_size} ({llm})"
        )
    if proj["linear_2.weight"].shape[1] != proj["linear_1.weight"].shape[0]:
        raise AssemblyError(f"{projector}: linear_2 input dim does not match linear_1 output dim")

    tokenizer = AutoTokenizer.from_pretrained(llm)
    new_ids = _add_tokens(tokenizer, image_token)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    pad_id = tokenizer.pad_token_id

    state = map_llm_keys(load_hf_weights(llm))
    old_rows = state["model.language_model.embed_tokens.weight"].shape[0]
    if old_rows != text_config.vocab_size:
        raise AssemblyError(f"{llm}: embedding rows {old_rows} != config vocab_size {text_config.vocab_size}")
    rows = -(-max(len(tokenizer), old_rows) // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    state = _resize_vocab(state, rows, [i for i in new_ids if i < old_rows])
    target = dtype or state["model.language_model.embed_tokens.weight"].dtype
    state.update(map_vision_keys(load_hf_weights(vision)))
    state.update({"model.multi_modal_projector." + k: v for k, v in proj.items()})
    state = {k: v.to(target) for k, v in state.items()}

    text_config.vocab_size = rows
    text_config.pad_token_id = pad_id
    grid = vision_config.image_size // vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=grid * grid,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        projector_hidden_act=PROJECTOR_HIDDEN_ACT,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise AssemblyError(f"key mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.to(target)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id
    )

    # LLaVA's CLIPImageProcessor is the PIL one: the "pil" backend keeps its numerics.
    image_processor = AutoImageProcessor.from_pretrained(vision, backend="pil")
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        chat_template=llava_chat_template(image_token),
        image_token=image_token,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
    )

    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_vlm(model, processor, tmp)
        write_json(
            tmp / ASSEMBLY_INFO,
            {
                "inputs": info,
                "image_token_id": image_token_id,
                "pad_token_id": pad_id,
                "vocab_rows": rows,
                "dtype": str(target),
                "transformers": transformers.__version__,
            },
        )
    return out


__all__ = [
    "AssemblyError",
    "UnsafeCheckpointError",
    "assemble_llava",
    "llava_chat_template",
    "load_hf_weights",
    "load_projector",
    "load_tensor_file",
]
