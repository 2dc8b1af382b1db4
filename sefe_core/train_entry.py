"""Entry point of one task's training, runnable in a fresh process:

    python -m sefe_core.train_entry --base BASE --data TASK.parquet --image-root IMAGES \\
        --task-dir RUN/reglora/task-03-imagenet --method reglora \\
        --prior RUN/reglora/task-01-scienceqa RUN/reglora/task-02-textvqa --set preset=minicoin

and, on several GPUs, the same module under accelerate (DeepSpeed ZeRO-2/3 configs are shipped in
`sefe_core/configs/`):

    accelerate launch --config_file sefe_core/configs/accelerate_zero2.yaml \\
        -m sefe_core.train_entry ... --set deepspeed=zero2

It resumes from the task's last complete checkpoint and does nothing for a finished task; the
last line of stdout is the TrainResult as JSON (paths, steps run, seconds, final loss).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sefe_core.train_entry", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base model directory (llava-hf layout)")
    p.add_argument("--data", required=True, help="instructions Parquet of the task (rows with split=train)")
    p.add_argument("--image-root", default=None, help="directory the records' image paths are relative to")
    p.add_argument("--task-dir", required=True, help="<run_dir>/<method>/task-<name>")
    p.add_argument("--method", required=True, help="lora, reglora, reglora-random, l1, asd, sefe")
    p.add_argument("--prior", nargs="*", default=[], help="finished task dirs of tasks 1..k-1, in order")
    p.add_argument("--config", default=None, help="YAML/JSON file with TrainConfig fields")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="field=value (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from sefe_core.config import apply_overrides
    from sefe_core.train import TrainConfig, train_task

    data = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    cfg = TrainConfig.model_validate(apply_overrides(data or {}, args.overrides))
    result = train_task(
        args.base,
        [Path(p) for p in args.prior],
        Path(args.data),
        args.image_root,
        args.task_dir,
        cfg,
        args.method,
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(result.as_json()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
