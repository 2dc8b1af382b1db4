"""Greedy answers from vLLM's offline engine: the program `eval.backend=vllm` runs in vLLM's own
environment (vLLM pins other transformers versions than the project, so it never shares the
project's). It imports vLLM, PIL and, for the one shared preprocessing step, `sefe_core.vlm`'s
`pad_to_square` (PIL only), with the repository on PYTHONPATH.

    <vllm-python> -m sefe_core.vllm_generate REQUESTS.jsonl ANSWERS.jsonl --model DIR [--dtype D]
        [--engine-args JSON]

Each request line: {"prompt": the full prompt text (the checkpoint's chat template, applied by
the project exactly as for its own `generate`, with one "<image>" where the image goes),
"image": path or null, "fill": pad colour (the processor's mean, 0..1), "max_tokens": n}. Each
answer line, in request order: {"text": ..., "finish_reason": ...}. Answers are written to a
temporary file and renamed, so a killed run leaves none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("requests")
    ap.add_argument("answers")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engine-args", default="{}", help="more vllm.LLM keyword arguments, as JSON")
    a = ap.parse_args(argv)

    from PIL import Image
    from vllm import LLM, SamplingParams

    from sefe_core.vlm import pad_to_square

    with open(a.requests) as f:
        requests = [json.loads(line) for line in f if line.strip()]
    t0 = time.perf_counter()
    engine = {"enforce_eager": True, "limit_mm_per_prompt": {"image": 1}, **json.loads(a.engine_args)}
    llm = LLM(model=a.model, dtype=a.dtype, **engine)
    load_s = time.perf_counter() - t0
    prompts, params = [], []
    for r in requests:
        p: dict = {"prompt": r["prompt"]}
        if r.get("image"):
            with Image.open(r["image"]) as im:
                p["multi_modal_data"] = {"image": pad_to_square(im.convert("RGB"), r["fill"])}
        prompts.append(p)
        params.append(SamplingParams(temperature=0.0, max_tokens=int(r["max_tokens"])))
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True) if prompts else []
    gen_s = time.perf_counter() - t1
    tmp = a.answers + ".tmp"
    with open(tmp, "w") as f:
        for o in outputs:
            c = o.outputs[0]
            f.write(json.dumps({"text": c.text, "finish_reason": c.finish_reason}) + "\n")
    os.replace(tmp, a.answers)
    print(
        f"SEFE-VLLM {len(outputs)} answers; engine load {load_s:.1f} s, generation {gen_s:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
