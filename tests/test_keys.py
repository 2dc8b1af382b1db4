"""What re-runs when I change X? One table, checked against the keys every step is cached by
(sefe_core/keys.py: the flows' Prefect cache and the library's own resume check both use them).

A row lists the steps whose *own* key reads the changed field; their dependants re-run in turn
because their inputs' digests change (test_pipeline checks that end to end)."""

from __future__ import annotations

import pytest

from sefe_core import keys
from sefe_core.config import RunConfig, load_config

METHODS = ["lora", "sefe", "reglora-random", "l1", "olora"]
BASE = ["tiny-llava-0", "cafe"]


def step_keys(cfg: RunConfig) -> dict[str, dict]:
    """Every step's key of task 2 for each method, on fixed input digests."""
    out = {
        "prepare-benchmark": keys.benchmark_key(cfg, None),
        "prepare-base": keys.base_key(cfg),
        "asd": keys.asd_key(cfg, "02-textvqa", "sha-of-records"),
        "comparison-report": keys.comparison_key(cfg.methods, [["p1"]] * len(cfg.methods)),
    }
    for m in METHODS:
        priors = [["sha-of-adapter-1", "sha-of-mask-1"]]
        out[f"train {m}"] = keys.train_key(cfg.train, m, "sha-of-data", BASE, priors)
        out[f"after-task {m}"] = keys.after_task_key(cfg.train, m, "sha-of-adapter-2")
        out[f"evaluate {m}"] = keys.eval_key(cfg, m, BASE, ["a1", "a2"], ["t1", "t2"])
        out[f"method-report {m}"] = keys.method_report_key(m, ["p1", "p2"])
    return out


PENALISED = ["train sefe", "train reglora-random", "train l1"]
MASKED = ["after-task sefe", "after-task reglora-random"]
ALL_TRAIN = [f"train {m}" for m in METHODS]
# change -> the steps whose own key changes
TABLE: list[tuple[str, list[str]]] = [
    ("benchmark.minicoin.n_train=10", ["prepare-benchmark"]),
    ("benchmark.minicoin.seed=3", ["prepare-benchmark"]),
    ("model.tiny.text_layers=2", ["prepare-base"]),
    ("asd.percent=40", ["asd"]),
    ("asd.seed=1", ["asd"]),
    ("asd.recipe=reference", ["asd"]),
    ("asd.mode=replace", ["asd"]),
    ("train.lora_r=8", ALL_TRAIN),
    ("train.learning_rate=0.01", ALL_TRAIN),
    ("train.reg_lambda=10", PENALISED),
    ("train.mask_percent=5", MASKED),
    ("train.seed=1", [*ALL_TRAIN, *MASKED]),
    ("train.method_settings={olora: {lambda_orth: 0.1}}", ["train olora"]),
    ("eval.batch_size=8", [f"evaluate {m}" for m in METHODS]),
    ("eval.max_new_tokens=8", [f"evaluate {m}" for m in METHODS]),
    ("eval.max_new_tokens={02-textvqa: 3}", [f"evaluate {m}" for m in METHODS]),
    ("eval.dtype=float32", []),  # what auto resolves to on a CPU: the same evaluation
    ("eval.dtype=bfloat16", [f"evaluate {m}" for m in METHODS]),
    ("eval.max_new_tokens={02-textvqa: 6}", []),  # its default, written out
    ("eval.backend=vllm", [f"evaluate {m}" for m in METHODS]),
    ("eval.vllm_python=/opt/vllm/bin/python", []),  # where it is installed
    ("eval.vllm_engine_args={max_model_len: 256}", []),  # counts only with backend vllm
    ("asd.server.launch={command: vllm serve m}", []),  # how the server starts, not what it answers
    ("methods=[lora,sefe]", ["comparison-report"]),
    # bookkeeping and parallelism: never re-run anything
    ("train.logging_steps=1", []),
    ("train.save_steps=7", []),
    ("train.keep_checkpoints=true", []),
    ("train.cpu_threads=2", []),
    ("workers=1", []),
    ("experiment=elsewhere", []),
]


@pytest.mark.parametrize(("change", "expected"), TABLE, ids=[c for c, _ in TABLE])
def test_what_reruns_when_a_field_changes(change: str, expected: list[str]) -> None:
    before = step_keys(load_config(None, [f"methods=[{','.join(METHODS)}]"]))
    after = step_keys(load_config(None, [f"methods=[{','.join(METHODS)}]", change]))
    changed = sorted(k for k in before if keys.digest(before[k]) != keys.digest(after[k]))
    assert changed == sorted(expected)


def test_the_library_and_the_flow_key_a_task_alike(small_run, tmp_path) -> None:
    """`train_task` records a task under the digest of the same `train_key` the flow's train step
    is cached by (the step fails loudly if they ever disagree)."""
    from data_contracts import sha256_file
    from sefe_core.train import TrainConfig, train_task

    _, bench, base = small_run
    cfg = TrainConfig.minicoin(max_steps=1, lora_r=2, lora_alpha=4, per_device_train_batch_size=4)
    data = bench.task_file("01-scienceqa")
    d1 = tmp_path / "reglora" / "task-01-scienceqa"
    res = train_task(base.path, [], data, bench.image_root, d1, cfg, "reglora")
    flow_key = keys.train_key(cfg, "reglora", sha256_file(data), keys.base_identity(base.path), [])
    assert res.config_hash == keys.digest(flow_key)
    d2 = tmp_path / "reglora" / "task-03-imagenet"
    data2 = bench.task_file("03-imagenet")
    res2 = train_task(base.path, [d1], data2, bench.image_root, d2, cfg, "reglora")
    priors = [
        [sha256_file(d1 / "adapter" / "adapter_model.safetensors"), sha256_file(d1 / "mask.safetensors")]
    ]
    flow_key2 = keys.train_key(cfg, "reglora", sha256_file(data2), keys.base_identity(base.path), priors)
    assert res2.config_hash == keys.digest(flow_key2)


@pytest.mark.parametrize("method", ["reglora", "sefe", "l1", "olora"])
def test_first_task_key_leaves_out_what_weighs_only_earlier_tasks(method: str) -> None:
    """λ weighs a penalty against earlier tasks: task 1 (none) trains the same for every λ, so a
    λ sweep trains it once. O-LoRA's settings act on task 1 too and stay in its key."""
    a, b = (
        load_config(None, []),
        load_config(None, ["train.reg_lambda=10", "train.method_settings={olora: {lambda_l2: 0.1}}"]),
    )
    first = [keys.train_key(c.train, method, "d", BASE, []) for c in (a, b)]
    second = [keys.train_key(c.train, method, "d", BASE, [["a1", "m1"]]) for c in (a, b)]
    assert (first[0] == first[1]) == (method != "olora")
    assert second[0] != second[1]
