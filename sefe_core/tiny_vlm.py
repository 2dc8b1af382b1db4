"""The embedded tiny LLaVA: built offline in two pre-training stages, saved with save_pretrained.

Later steps load it with `vlm.load_vlm`, the same `from_pretrained` path a llava-hf checkpoint
takes. What it learns before any task (`tiny_pretrain`): its vision tower on dense labels of
MiniCoIN-like pictures, then generic instructions in every answer style, never a task's own
prompt or task knowledge, so each MiniCoIN task still has to be learned by its own LoRA.

Building the default takes minutes on 2 cores, so the default is shipped in the repository
(`sefe_core/assets/tiny-llava/`, with its build record and the command that rebuilds it), as
LLaVA-1.5's users download it rather than pre-train it. `ensure_tiny_vlm` copies it into the run
directory when the requested config is the shipped one; any other config (the tests' short ones,
`model.tiny.use_shipped=false`) is built here through the same code.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from data_contracts import atomic_path, write_json
from sefe_core.hashing import stable_seed
from sefe_core.kinds import get_kind
from sefe_core.progress import BAR_COLUMNS as _BAR
from sefe_core.progress import RichProgressCallback, step_progress
from sefe_core.registry import benchmark_tasks
from sefe_core.scenes import COLORS, SHAPES, answer_vocabulary
from sefe_core.tiny_config import BUILDER_VERSION, REBUILD_COMMAND, SHIPPED, BaseModel, TinyVLMConfig
from sefe_core.tiny_pretrain import CURRICULUM, FAMILIES, PhaseData, instruction_mix, pretrain_vision, probe
from sefe_core.vlm import VLMCollator, load_vlm, save_vlm

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
# The chat template of llava-hf/llava-1.5-7b-hf, which the tiny model shares.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Text ASD writes, for the tiny model's tokenizer
# --------------------------------------------------------------------------------------------
def asd_sample_texts(n_per_task: int = 40) -> list[str]:
    """Questions and answers the rules backend writes for in-memory MiniCoIN samples, every
    target style of every task, both yes/no outcomes: the tiny model's word-level tokenizer is
    built over them so that no ASD row holds an unknown word."""
    from data_contracts import InstructionRecord
    from sefe_core.asd import build_request, convert, target_styles
    from sefe_core.rewriter_rules import RulesRewriter
    from sefe_core.styles import STYLE_INSTRUCTIONS

    texts = list(STYLE_INSTRUCTIONS.values()) + ["Yes No"]
    rules = RulesRewriter(0)
    for spec in benchmark_tasks("minicoin"):
        rng = np.random.default_rng(stable_seed("asd-sample-texts", spec.name))
        for i in range(n_per_task):
            _, q, a, meta = get_kind(spec.scorer).generate(rng)
            rid = f"{spec.name}-sample-{i:05d}"
            rec = InstructionRecord(
                rid,
                spec.name,
                "train",
                "sample.png",
                q,
                a,
                spec.native_style,
                "original",
                rid,
                json.dumps(meta),
            )
            for style in target_styles(spec.native_style):
                req = build_request(rec, style, spec.scorer, spec.native_style)
                for seed in (0, 1):
                    rows, _ = convert([req], rules.rewrite([req], Path(".")), seed, rules.name)
                    texts += [t for r in rows for t in (r.question, " " + r.answer)]
    return texts


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def corpus_texts(n_per_task: int = 300) -> list[str]:
    """Text the tokenizer must cover: MiniCoIN prompts and answers, pre-training text, templates."""
    texts = [CHAT_TEMPLATE.replace("{", " ").replace("}", " "), "USER: ASSISTANT:"]
    for spec in benchmark_tasks("minicoin"):
        rng = np.random.default_rng(stable_seed("tokenizer-corpus", spec.name))
        for _ in range(n_per_task):
            _, q, a, _ = get_kind(spec.scorer).generate(rng)
            texts += [q, " " + a]
    texts += [s.question + " " + s.answer for s in instruction_mix(3000, seed=12345)]
    rng = np.random.default_rng(stable_seed("tokenizer-corpus", "families"))
    texts += [
        s.question + " " + s.answer for f in FAMILIES.values() for s in (f(rng, 0.4) for _ in range(300))
    ]
    texts += asd_sample_texts()  # every word ASD's rules and style instructions write
    words = answer_vocabulary() + list(COLORS) + list(SHAPES) + [str(i) for i in range(101)]
    words += [f"{i:02d}" for i in range(100)] + list("[],.?:;'\"()-!ABCDE")
    texts += [" ".join(words)]
    return texts


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over byte-level pieces: whole words are single tokens, and decoding
    restores the exact text (spaces and punctuation), which the scorers rely on. The 256 byte
    characters are tokens too, so a constrained decoder (vLLM's structured output) can spell any
    JSON even though unknown words still encode as <unk>."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces: set[str] = set()
    for t in texts:
        for line in t.split("\n"):
            for piece, _ in pre.pre_tokenize_str(line):
                bare = piece.removeprefix("Ġ")
                pieces |= {bare, "Ġ" + bare} if bare else {piece}
    pieces.add("Ċ")  # newline
    pieces |= set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for p in sorted(pieces):
        vocab.setdefault(p, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
    )


# --------------------------------------------------------------------------------------------
# Model + processor
# --------------------------------------------------------------------------------------------
def build_processor(tokenizer: PreTrainedTokenizerFast, cfg: TinyVLMConfig) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, cfg: TinyVLMConfig) -> LlavaForConditionalGeneration:
    torch.manual_seed(cfg.seed)
    vision = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=2,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        head_dim=cfg.text_head_dim,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


@torch.no_grad()
def heldout_loss(
    model: LlavaForConditionalGeneration, collator: VLMCollator, samples: list[dict], batch: int = 64
) -> float:
    """Mean per-token cross-entropy on answer tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch):
        b = collator(samples[i : i + batch])
        n = int((b["labels"][:, 1:] != -100).sum())
        total += float(model(**b).loss) * n
        count += n
    return total / max(count, 1)


def _from_record(path: Path, key: str, reused: bool) -> BaseModel:
    info = json.loads((path / "pretrain.json").read_text())
    return BaseModel(
        path, key, info["heldout_loss_before"], info["heldout_loss_after"], info["pretrain_seconds"],
        reused=reused, probe=info.get("probe"), origin=info.get("origin", "built"),
    )  # fmt: skip


DEFAULT = TinyVLMConfig()


def shipped_key() -> str | None:
    """The config key the shipped base was built from (None when none is shipped)."""
    record = SHIPPED / "pretrain.json"
    return json.loads(record.read_text())["key"] if record.exists() else None


def ensure_tiny_vlm(
    root: str | Path, cfg: TinyVLMConfig = DEFAULT, progress: Callable[[str, int, int], None] | None = None
) -> BaseModel:
    """The tiny base under `root/tiny-llava-<key>/`: reused if present, copied from the shipped
    artifact when that was built from this config, else built (both stages) here.

    The directory appears atomically (built in a temp dir, then renamed), so a crash mid-way
    never leaves a half model that a later call would trust. `progress(phase, done, total)`
    reports the build's two stages (the Prefect step mirrors it into the UI)."""
    root = Path(root)
    key = cfg.key()
    final = root / f"tiny-llava-{key}"
    if (final / "pretrain.json").exists():
        return _from_record(final, key, reused=True)
    if cfg.use_shipped and shipped_key() == key:
        with atomic_path(final) as tmp:
            shutil.copytree(SHIPPED, tmp)
            info = json.loads((tmp / "pretrain.json").read_text())
            write_json(tmp / "pretrain.json", {**info, "origin": "shipped"})
        return _from_record(final, key, reused=True)
    work = root / f".tiny-llava-{key}.building"
    build_tiny_vlm(work / "model", cfg, progress)
    with atomic_path(final) as tmp:
        shutil.move(str(work / "model"), tmp)
    shutil.rmtree(work, ignore_errors=True)
    return _from_record(final, key, reused=False)


def build_tiny_vlm(
    out: str | Path, cfg: TinyVLMConfig = DEFAULT, progress: Callable[[str, int, int], None] | None = None
) -> Path:
    """Build and pre-train the tiny model into `out` (save_pretrained + pretrain.json, the build
    record). Deterministic for a config on one machine: every random draw is seeded."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(corpus_texts())
    processor = build_processor(tokenizer, cfg)
    model = build_model(tokenizer, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny matrices do not split across cores (BENCHMARKS.md)
    try:
        with Progress(*_BAR, transient=False) as bar:
            tid = bar.add_task("pre-training tiny LLaVA: vision", total=cfg.vision_steps, loss="-")

            def vision_step(done: int, total: int, loss: float) -> None:
                bar.update(tid, completed=done, loss=f"{loss:.3f}")
                if progress is not None and (done % max(1, total // 20) == 0 or done == total):
                    progress("vision", done, total)

            vision_acc = pretrain_vision(
                model, processor, cfg.vision_steps, cfg.vision_batch, cfg.vision_lr, cfg.seed, vision_step
            )
        vision_seconds = time.perf_counter() - t0
        before, after, trainer_seconds, phases = _instruction_pretrain(
            model, processor, cfg, out / "trainer", progress
        )
        probe_acc = probe(model, processor)
    finally:
        torch.set_num_threads(threads)
    save_vlm(model, processor, out)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    write_json(
        out / "pretrain.json",
        {
            "key": cfg.key(),
            "config": asdict(cfg),
            "builder_version": BUILDER_VERSION,
            "command": REBUILD_COMMAND,
            "heldout_loss_before": before,
            "heldout_loss_after": after,
            "vision_cell_accuracy": vision_acc,
            "probe": probe_acc,
            "vision_seconds": vision_seconds,
            "instruction_seconds": trainer_seconds,
            "instruction_phases": phases,
            "pretrain_seconds": time.perf_counter() - t0,
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__,
            "origin": "built",
        },
    )
    return out


def _instruction_pretrain(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, cfg: TinyVLMConfig, work: Path,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[float, float, float, list[dict[str, Any]]]:  # fmt: skip
    """Stage 2 with Trainer, one run per curriculum phase (`CURRICULUM`): projector + language
    model, the vision tower frozen (as LLaVA-1.5 trains). Returns the held-out loss (generic
    questions) before and after, the seconds, and a record per phase."""
    sizes = dict(
        zip([p.name for p in CURRICULUM], (cfg.pretrain_samples, *cfg.curriculum_samples), strict=True)
    )
    batches = {name: math.ceil(n / cfg.pretrain_batch) * cfg.pretrain_epochs for name, n in sizes.items()}
    total, done = sum(batches.values()), 0
    heldout_data = PhaseData(CURRICULUM[0], cfg.pretrain_heldout, cfg.seed, cfg.pretrain_box_share, "heldout")
    heldout = [heldout_data[i] for i in range(len(heldout_data))]
    collator = VLMCollator(processor)
    before = heldout_loss(model, collator, heldout)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    t0, record = time.perf_counter(), []
    for i, phase in enumerate(CURRICULUM):
        if sizes[phase.name] == 0:
            continue
        t_phase = time.perf_counter()
        data = PhaseData(phase, sizes[phase.name], cfg.seed, cfg.pretrain_box_share)
        args = TrainingArguments(
            output_dir=str(work / phase.name),
            per_device_train_batch_size=cfg.pretrain_batch,
            num_train_epochs=cfg.pretrain_epochs,
            learning_rate=cfg.pretrain_lr * phase.lr_scale,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, int(0.03 * batches[phase.name])),
            weight_decay=0.0,
            logging_steps=25,
            disable_tqdm=True,
            save_strategy="no",
            report_to=[],
            seed=cfg.seed,
            data_seed=cfg.seed,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
        )
        label = f"pre-training tiny LLaVA: instructions, phase {i + 1}/{len(CURRICULUM)} ({phase.name})"
        callbacks: list[Any] = [RichProgressCallback(label)]
        if progress is not None:  # one bar over all phases: the phases are one stage to a user
            callbacks.append(step_progress(lambda d, t, off=done: progress("instructions", off + d, total)))
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss instead
        out = trainer.train()
        done += batches[phase.name]
        record.append({
            "phase": phase.name, "mix": phase.mix, "samples": sizes[phase.name], "steps": out.global_step,
            "learning_rate": args.learning_rate, "train_loss": out.training_loss,
            "seconds": time.perf_counter() - t_phase,
        })  # fmt: skip
    seconds = time.perf_counter() - t0
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(True)
    return before, heldout_loss(model, collator, heldout), seconds, record


__all__ = [
    "TinyVLMConfig",
    "build_tiny_vlm",
    "ensure_tiny_vlm",
    "build_tokenizer",
    "corpus_texts",
    "load_vlm",
]
