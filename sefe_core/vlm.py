"""Loading a LLaVA-class model and turning instruction records into model inputs.

Every step (pre-training, per-task training, evaluation) goes through these functions, and they
take the same path for the embedded tiny model as for a real llava-hf checkpoint:
`from_pretrained` on a directory, the checkpoint's own chat template, LLaVA's pad-to-square.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, ProcessorMixin

from sefe_core import counters

IGNORE_INDEX = -100


def load_vlm(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[LlavaForConditionalGeneration, ProcessorMixin]:
    """Load model + processor from a local directory (or a hub id where the user allows it)."""
    model = LlavaForConditionalGeneration.from_pretrained(
        str(path), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
    ).to(device)
    processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, processor


# vLLM (0.32) reads a LLaVA vision tower under `vision_tower.vision_model.*`, the llava-hf layout;
# transformers 5.23 writes `vision_tower.*` and reads either (its conversion mapping).
_VISION = "vision_tower."
_VISION_MODEL = "vision_tower.vision_model."


def save_vlm(model: LlavaForConditionalGeneration, processor: ProcessorMixin, out: str | Path) -> Path:
    """`save_pretrained` of model and processor, with the weights in the llava-hf key layout
    that vLLM and transformers both load: every checkpoint this project writes as a full model
    (the tiny base, `sefe assemble`, an exported stage) goes through here."""
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    to_llava_hf_layout(out)
    return out


def to_llava_hf_layout(directory: str | Path) -> int:
    """Rename `vision_tower.<x>` to `vision_tower.vision_model.<x>` in the directory's safetensors
    files (and their index); returns how many keys moved. Tensors and metadata are unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def moved(key: str) -> str:
        keep = not key.startswith(_VISION) or key.startswith(_VISION_MODEL)
        return key if keep else _VISION_MODEL + key[len(_VISION) :]

    directory, n = Path(directory), 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata(), list(f.keys())
        if all(moved(k) == k for k in keys):
            continue
        tensors = load_file(str(path))
        n += sum(moved(k) != k for k in keys)
        save_file({moved(k): v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {moved(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return n


def pad_to_square(img: Image.Image, fill: Sequence[float]) -> Image.Image:
    """LLaVA-1.5's expand2square: pad with the processor's mean colour, centre the image.

    Boxes of the grounding task are normalised in this padded frame.
    """
    img = img.convert("RGB")
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    color = tuple(
        int(255 * c) for c in fill
    )  # truncated, as LLaVA's `int(x * 255)`: (122, 116, 104) for CLIP
    out = Image.new("RGB", (side, side), color)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def prompt_text(processor: ProcessorMixin, question: str, image: bool = True) -> str:
    """The checkpoint's own chat template with the question (after one image, unless the question
    is text-only: then no image token, as LLaVA prompts a record without `image`)."""
    content = [{"type": "image"}] if image else []
    conversation = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def has_image(sample: dict[str, Any]) -> bool:
    return sample.get("image") is not None


def open_image(
    image: str | Path | Image.Image, image_root: Path | None, processor: ProcessorMixin
) -> Image.Image:
    if not isinstance(image, Image.Image):
        path = Path(image) if image_root is None else image_root / image
        with Image.open(path) as im:
            image = im.convert("RGB")
    return pad_to_square(image, processor.image_processor.image_mean)


class SampleDataset(torch.utils.data.Dataset):
    """A list of sample dicts as a map-style Dataset, for `Trainer(train_dataset=...)`.

    The samples stay plain dicts ({image, question, answer}); `VLMCollator` turns a batch of them
    into tensors, so pre-training and per-task training share this one container.
    """

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def lengths(self) -> list[int]:
        """Approximate token counts (words of question + answer), for length-grouped batches."""
        return [len(it["question"].split()) + len(it["answer"].split()) for it in self.items]


@dataclass
class VLMCollator:
    """Batches samples {image, question, answer} for causal-LM training.

    The prompt goes through the processor (which expands the image token); the answer and EOS
    are appended as plain token ids, so only answer tokens carry labels. Right padding.
    """

    processor: ProcessorMixin
    image_root: Path | None = None
    max_length: int | None = None

    def encode(self, samples: list[dict[str, Any]], with_pixels: bool = True) -> list[dict[str, Any]]:
        """Per sample: token ids, labels (answer tokens only) and pixel values, unpadded; without
        pixels, the image path instead (`pad` preprocesses it per batch). A text-only sample
        (image None) has neither: its prompt holds no image token."""
        tok = self.processor.tokenizer
        prompts = [prompt_text(self.processor, s["question"], has_image(s)) for s in samples]
        prompt_ids: list[list[int]] = [[] for _ in samples]
        pixels: list[Any] = [None] * len(samples)
        text_only = [i for i, s in enumerate(samples) if not has_image(s)]
        if text_only:  # what the processor would do with text and no images: tokenise
            for i, ids in zip(text_only, tok([prompts[i] for i in text_only])["input_ids"], strict=True):
                prompt_ids[i] = list(ids)
        imaged = [i for i, s in enumerate(samples) if has_image(s)]
        if imaged:
            subset, sub_prompts = [samples[i] for i in imaged], [prompts[i] for i in imaged]
            if with_pixels:
                images = [open_image(s["image"], self.image_root, self.processor) for s in subset]
                enc = self.processor(images=images, text=sub_prompts, return_tensors=None, padding=False)
                for j, i in enumerate(imaged):
                    prompt_ids[i], pixels[i] = list(enc["input_ids"][j]), enc["pixel_values"][j]
            else:
                for i, ids in zip(imaged, self._prompt_ids(subset, sub_prompts), strict=True):
                    prompt_ids[i] = list(ids)
        answers = tok([" " + s["answer"] for s in samples], add_special_tokens=False)["input_ids"]
        out = []
        for s, p_ids, a_ids, pix in zip(samples, prompt_ids, answers, pixels, strict=True):
            ids = p_ids + list(a_ids) + [tok.eos_token_id]
            lab = [IGNORE_INDEX] * len(p_ids) + list(a_ids) + [tok.eos_token_id]
            if self.max_length is not None:
                ids, lab = ids[: self.max_length], lab[: self.max_length]
            item: dict[str, Any] = {"input_ids": ids, "labels": lab}
            if with_pixels and pix is not None:
                item["pixel_values"] = np.asarray(pix)
            else:
                item["image"] = s.get("image")
            out.append(item)
        return out

    def _prompt_ids(self, samples: list[dict[str, Any]], prompts: list[str]) -> list[list[int]]:
        """Prompt token ids without preprocessing every image: a fixed-size image processor gives
        every image the same number of image tokens, so the first sample goes through the
        processor and the others get its run of image tokens in place of their one image token
        (checked against the processor's ids for that first sample; otherwise all go through it)."""
        tok = self.processor.tokenizer
        image_id = tok.convert_tokens_to_ids(self.processor.image_token)
        first = open_image(samples[0]["image"], self.image_root, self.processor)
        full = self.processor(images=[first], text=prompts[:1], return_tensors=None, padding=False)[
            "input_ids"
        ][0]
        plain = tok(prompts)["input_ids"]  # what the processor hands its tokenizer, unexpanded
        n = sum(t == image_id for t in full)

        def expand(ids: list[int]) -> list[int]:
            at = [i for i, t in enumerate(ids) if t == image_id]
            return ids[: at[0]] + [image_id] * n + ids[at[0] + 1 :] if len(at) == 1 else []

        if expand(list(plain[0])) != list(full):  # not a fixed-size layout: the processor decides
            images = [open_image(s["image"], self.image_root, self.processor) for s in samples]
            return self.processor(images=images, text=prompts, return_tensors=None, padding=False)[
                "input_ids"
            ]
        return [expand(list(ids)) for ids in plain]

    def pad(self, encoded: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        label_t = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            attention[i, :n] = 1
            label_t[i, :n] = torch.tensor(e["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}
        if any("pixel_values" in e for e in encoded):
            stacked = [e["pixel_values"] for e in encoded if "pixel_values" in e]
            batch["pixel_values"] = torch.as_tensor(np.stack(stacked))
        elif any(has_image(e) for e in encoded):  # items that keep their image path: preprocessed
            images = [
                open_image(e["image"], self.image_root, self.processor) for e in encoded if has_image(e)
            ]
            batch["pixel_values"] = torch.as_tensor(
                self.processor.image_processor(images, return_tensors="np")["pixel_values"]
            )
        # the images of a batch in sample order: the model fills the image tokens in that order,
        # and a text-only sample has none (a batch of text-only samples has no pixel_values)
        return batch

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Raw samples are encoded first; items of an `EncodedDataset` are only padded."""
        return self.pad(samples if samples and "input_ids" in samples[0] else self.encode(samples))


class EncodedDataset(SampleDataset):
    """Samples encoded once (tokenised, images opened and preprocessed) instead of once per epoch:
    collation was 15% of a MiniCoIN training step (BENCHMARKS.md). Batches and their order are
    those of the raw samples (same lengths for length grouping), so results do not change."""

    def __init__(self, items: list[dict[str, Any]], collator: VLMCollator, chunk: int = 64):
        super().__init__(items)
        self.encoded = [e for i in range(0, len(items), chunk) for e in collator.encode(items[i : i + chunk])]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.encoded[i]


@torch.no_grad()
def generate_answers(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    samples: Sequence[dict[str, Any]],
    *,
    image_root: Path | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    sort_by_length: bool = True,
    count: bool = True,
) -> list[str]:
    """Greedy answers for {image, question} samples (image None: text-only), batched with left
    padding, in input order.

    With `sort_by_length`, samples are batched in order of prompt length so a batch pads little;
    answers come back in the caller's order either way.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok = processor.tokenizer
    prompts = [prompt_text(processor, s["question"], has_image(s)) for s in samples]
    order = list(range(len(samples)))
    if sort_by_length and batch_size > 1 and len(samples) > batch_size:
        lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
        order.sort(key=lengths.__getitem__)
    old_side = tok.padding_side
    tok.padding_side = "left"
    model.eval()
    out: list[str] = [""] * len(samples)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            images = [
                open_image(samples[i]["image"], image_root, processor) for i in idx if has_image(samples[i])
            ]
            enc = processor(
                images=images or None, text=[prompts[i] for i in idx], return_tensors="pt", padding=True
            ).to(model.device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True), strict=True):
                out[i] = text.strip()
            if count:  # lets a rerun prove it generated nothing (a base model's build probe does not count)
                counters.add("generations", len(idx))
    finally:
        tok.padding_side = old_side
    return out
