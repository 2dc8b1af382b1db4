"""Faults and bad input (issue 16), one per test, each against an untouched run of the same
config: a damaged or swapped file is found by its content and rebuilt by the step that made it,
so the final metrics equal the untouched run's; never re-blessed as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_contracts import sha256_file
from tests.conftest import small_config

TASKS = ["01-scienceqa", "02-textvqa", "03-imagenet"]
CONFIG = [
    f"benchmark.minicoin.tasks=[{','.join(TASKS)}]",
    "methods=[reglora]",  # adapters, projectors and masks
    "train.max_steps=3",
]


def _metrics(out: dict) -> dict:
    return json.loads(Path(out["metrics"]).read_text())["methods"]


@pytest.fixture(scope="module")
def untouched_run(tmp_path_factory):
    """One run of the config, left as it finished: each fault test damages a copy of it."""
    from flows.pipeline import sefe_pipeline

    cfg = small_config(tmp_path_factory.mktemp("untouched"), *CONFIG)
    return cfg, _metrics(sefe_pipeline(cfg))


@pytest.fixture(scope="module")
def untouched(untouched_run) -> dict:
    return untouched_run[1]


@pytest.fixture
def finished(tmp_path, untouched_run):
    """A finished run of the same config, to damage: `cp -a` of the untouched one (a copied run
    directory is a run of its own, `test_a_copied_run_directory_uses_its_own_files`), which
    shows itself as complete before it is damaged."""
    from flows.pipeline import finished_pipeline

    source = untouched_run[0]
    shutil.copytree(source.run_dir, tmp_path / source.run_dir.name, symlinks=True)
    cfg = small_config(tmp_path, *CONFIG)
    shown = finished_pipeline(cfg)
    assert shown is not None and _metrics(shown) == untouched_run[1], "the copy must show as finished"
    return cfg


def _rerun(cfg) -> dict:
    from flows.pipeline import finished_pipeline, sefe_pipeline

    assert finished_pipeline(cfg) is None, "a damaged run must not be shown as complete"
    return sefe_pipeline(cfg)


def test_truncated_benchmark_file_is_rebuilt_not_reblessed(finished, untouched) -> None:
    cfg = finished
    (bench_dir,) = (cfg.run_dir / "benchmark").iterdir()
    target = bench_dir / f"{TASKS[1]}.parquet"
    good = sha256_file(target)
    with open(target, "r+b") as f:
        f.truncate(500)
    out = _rerun(cfg)
    assert sha256_file(target) == good  # MiniCoIN is regenerated from its config
    assert _metrics(out) == untouched
    assert out["work"]["train_steps"] == 0  # same records again: nothing downstream re-runs


def test_adapter_swapped_for_another_tasks_is_trained_again(finished, untouched) -> None:
    cfg = finished
    run = cfg.run_dir / "reglora"
    first, second = (run / f"task-{t}" / "adapter" / "adapter_model.safetensors" for t in TASKS[:2])
    assert first.stat().st_size == second.stat().st_size  # a swap the size check cannot see
    shutil.copy2(first, second)  # mtime preserved too
    out = _rerun(cfg)
    assert out["work"]["train_steps"] == 3  # task 2 again; task 3 reads the same adapter as before
    assert _metrics(out) == untouched


def test_truncated_projector_is_tracked_and_trained_again(finished, untouched) -> None:
    cfg = finished
    proj = cfg.run_dir / "reglora" / f"task-{TASKS[0]}" / "projector.safetensors"
    with open(proj, "r+b") as f:
        f.truncate(proj.stat().st_size // 2)
    out = _rerun(cfg)
    assert out["work"]["train_steps"] == 3
    assert _metrics(out) == untouched


def test_finished_task_recorded_without_hashes_is_checked_for_readability(small_run, tmp_path) -> None:
    """train.json of older runs holds no hashes: a truncated adapter is still not taken as trained."""
    from sefe_core.train import TrainConfig, train_task

    _, bench, base = small_run
    cfg = TrainConfig.minicoin(max_steps=2, lora_r=4, lora_alpha=8)
    d = tmp_path / "lora" / f"task-{TASKS[0]}"
    train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d, cfg, "lora")
    info = json.loads((d / "train.json").read_text())
    del info["files"]
    (d / "train.json").write_text(json.dumps(info))
    adapter = d / "adapter" / "adapter_model.safetensors"
    good = sha256_file(adapter)
    with open(adapter, "r+b") as f:
        f.truncate(adapter.stat().st_size - 100)
    res = train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d, cfg, "lora")
    assert res.steps_run == 2 and sha256_file(adapter) == good


def test_a_diverging_task_fails_with_a_named_error_and_saves_nothing(small_run, tmp_path) -> None:
    from sefe_core.train import TrainConfig, train_task
    from sefe_core.trainer import NonFiniteTraining

    _, bench, base = small_run
    cfg = TrainConfig.minicoin(max_steps=4, logging_steps=1, learning_rate=1e30, max_grad_norm=0.0, lora_r=4)
    d = tmp_path / "lora" / f"task-{TASKS[0]}"
    with pytest.raises(NonFiniteTraining, match="training diverged|not finite"):
        train_task(base.path, [], bench.task_file(TASKS[0]), bench.image_root, d, cfg, "lora")
    assert not (d / "train.json").exists() and not (d / "adapter").exists()


@pytest.mark.parametrize(
    "override, says",
    [
        ("benchmark.minicoin.n_train=0", "n_train and n_test must be at least 1"),
        ("benchmark.minicoin.n_test=0", "n_train and n_test must be at least 1"),
        ("benchmark.minicoin.tasks=[]", "tasks is empty"),
        ("benchmark.minicoin.tasks=[01-scienceqa,09-nope]", "unknown task(s) ['09-nope']"),
        ("model.tiny.pretrain_samples=0", "must be positive: pretrain_samples=0"),
        ("model.tiny.image_size=0", "must be positive: image_size=0"),
        ("model.tiny.curriculum_samples=[96,48]", "model.tiny.curriculum_samples.2: Field required"),
        ("model.tiny.curriculum_samples=[96,-1,48]", "curriculum_samples must be three sample counts"),
        ("train.learning_rate=.inf", "train.learning_rate: Input should be a finite number"),
        ("asd.percent=.nan", "asd.percent: Input should be a finite number"),
    ],
)
def test_configs_that_cannot_work_are_one_line_errors_before_anything_runs(tmp_path, override, says) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(
        app, ["run", "--set", f"runs_root={tmp_path}", "--set", override], env={"COLUMNS": "300"}
    )
    assert res.exit_code == 2, res.output
    assert says in res.output and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    "content, says",
    [
        (b"90,\n80,270\n", "270 is not an accuracy: the file reads as percentages"),
        (b"0.9,\n-0.1,0.8\n", "-0.1 is not an accuracy: the file reads as fractions"),
        (b"0.9,\ninf,0.8\n", "'inf' is not a finite number"),
        (b"0.9,\nnan,0.8\n", "'nan' is not a finite number"),
        (b"0.9,\n0.8,\xff\xfe\n", "not UTF-8 text"),
    ],
)
def test_sefe_metrics_refuses_what_is_not_an_accuracy_matrix(tmp_path, content, says) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    f = tmp_path / "m.csv"
    f.write_bytes(content)
    res = CliRunner().invoke(app, ["metrics", str(f), "--json"], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and says in " ".join(res.output.split()), res.output


def test_a_copied_run_directory_uses_its_own_files(finished, untouched, tmp_path_factory) -> None:
    """`cp -a runs/a runs/b`, damage b, run b: b is repaired from b's files and reports under b;
    a is not touched (stored results hold run-directory paths relative to it)."""
    from flows.pipeline import sefe_pipeline
    from sefe_core.evaluate import predictions_path

    a = finished
    copy_root = tmp_path_factory.mktemp("copied")
    shutil.copytree(a.run_dir, copy_root / a.run_dir.name, symlinks=True)
    b = small_config(copy_root, *CONFIG)
    before = {p: sha256_file(p) for p in a.run_dir.rglob("*") if p.is_file()}
    damaged = predictions_path(b.run_dir, "reglora", TASKS[1])
    with open(damaged, "r+b") as f:
        f.truncate(100)
    out = sefe_pipeline(b)
    assert Path(out["dir"]).is_relative_to(b.run_dir) and Path(out["metrics"]).is_relative_to(b.run_dir)
    assert out["work"] == {"train_steps": 0, "generations": 2 * 6}  # stage 2 again: tasks 1..2 x n_test
    assert _metrics(out) == untouched
    assert {p: sha256_file(p) for p in a.run_dir.rglob("*") if p.is_file()} == before
    # what the steps stored (Prefect's own record metadata names the file it was first written as)
    stored = [json.loads(p.read_text())["result"] for p in (b.run_dir / ".prefect-results").iterdir()]
    assert str(a.run_dir) not in json.dumps(stored) and "{run_dir}/" in json.dumps(stored)


@pytest.mark.parametrize("command", [["asd"], ["eval"], ["prepare"], ["report"], ["train", "-m", "lora"]])
def test_every_command_that_writes_a_run_directory_takes_its_lock(tmp_path, command) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from sefe_core.runlock import run_lock

    cfg = small_config(tmp_path)
    with run_lock(cfg.run_dir):  # another run holds it
        res = CliRunner().invoke(app, [*command, "--set", f"runs_root={tmp_path}"], env={"COLUMNS": "300"})
    assert res.exit_code == 1 and "in use by another run" in res.output, res.output
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == [".lock"]  # nothing written beside it


def test_a_yaml_error_names_the_file_and_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\ntrain:\n  lora_r: 8\n   learning_rate: 1\n")
    res = CliRunner().invoke(app, ["prepare", "-c", str(bad)], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and f"{bad}, line 4" in res.output and "Traceback" not in res.output, res.output


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB-and-a-bit tmpfs at tmp_path/disk (root only; skipped where mounting is refused)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size: int) -> Path:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()[:200]}")
        return disk

    yield mount
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_full_disk_is_named_as_such(small_run, small_disk) -> None:
    """The run's disk fills during training (the checkpoint's write fails with a SafetensorError,
    or torch's bare "enforce fail at inline_container.cc"): `sefe run` says the disk is full, in
    its last lines, rc 1."""
    import os
    import subprocess
    import sys

    from tests.conftest import SMALL

    cfg0, _, _ = small_run
    # what the prepared base and benchmark take on a tmpfs (whole 4 KiB pages per file and folder)
    made = sum(
        -(-f.stat().st_size // 4096) * 4096
        for d in ("benchmark", "base")
        for f in (cfg0.run_dir / d).rglob("*")
    )
    disk = small_disk(made + 600 * 1024)  # the prepared base and benchmark, and a little room
    for d in ("benchmark", "base"):
        shutil.copytree(cfg0.run_dir / d, disk / cfg0.run_dir.name / d)
    sets = [
        f"runs_root={disk}",
        f"benchmark.minicoin.tasks=[{TASKS[0]}]",
        "methods=[lora]",
        "train.max_steps=3",
    ]
    args = [a for x in [*SMALL, *sets] for a in ("--set", x)]
    r = subprocess.run(
        [str(Path(sys.executable).with_name("sefe")), "run", *args],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"}, timeout=900,
    )  # fmt: skip
    tail = r.stdout[-1500:]
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"Run stopped: the disk holding {disk / cfg0.run_dir.name} is full" in tail, tail


def test_a_failed_write_on_a_full_disk_is_recognised(tmp_path, monkeypatch) -> None:
    import errno
    import shutil as sh

    from flows.cli import DISK_FULL_BELOW, _known_failure

    enforce = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    free = {"bytes": 10 * 2**30}
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(2**40, 0, free["bytes"]))
    assert _known_failure(enforce, tmp_path) is None  # plenty of room: some other failure
    assert "is full" in _known_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    free["bytes"] = DISK_FULL_BELOW // 2
    why = _known_failure(enforce, tmp_path / "not-yet")
    assert (
        why.startswith(f"the disk holding {tmp_path / 'not-yet'} is full (32 MiB free")
        and "inline_container" in why
    )


# ------------------------------------------------------------------------------------------
# A served rewriter that misbehaves (a real HTTP server on 127.0.0.1, tests/fake_rewriter.py)
# ------------------------------------------------------------------------------------------
ASD_TASK = "03-imagenet"  # every style of it needs the rewriter


def _asd_cfg(url: str, **server):
    from sefe_core.asd import ASDConfig
    from sefe_core.rewriter import ServerConfig

    s = {**dict(base_url=url, model="fake", concurrency=2, backoff_s=0.01, retries=1), **server}
    return ASDConfig(percent=50, backend="openai", shard_size=3, server=ServerConfig(**s))


@pytest.fixture(scope="module")
def asd_untouched(small_run, tmp_path_factory) -> str:
    """sha256 of the ASD data a healthy rewriter gives the task."""
    from sefe_core.asd import run_asd
    from tests.fake_rewriter import FakeRewriter

    _, bench, _ = small_run
    with FakeRewriter() as fake:
        res = run_asd(
            bench.task_file(ASD_TASK), bench.image_root, tmp_path_factory.mktemp("asd"), _asd_cfg(fake.url)
        )
    assert res.rejected == 0 and res.converted == res.selected > 0
    return sha256_file(res.data_path)


@pytest.mark.parametrize("mode", ["html", "not-json", "null-content", "wrong-count", "cut"])
def test_bad_rewriter_replies_fail_the_task_and_are_retried_on_rerun(
    small_run, asd_untouched, tmp_path, mode
) -> None:
    from data_contracts import REJECTS
    from sefe_core.asd import TooManyRejects, run_asd
    from tests.fake_rewriter import FakeRewriter

    _, bench, _ = small_run
    with FakeRewriter() as fake:
        fake.mode = mode
        cfg = _asd_cfg(fake.url)
        with pytest.raises(
            TooManyRejects, match=r"rejected \(100% > asd.max_reject_fraction=0.5\).*sent again on a rerun"
        ):
            run_asd(bench.task_file(ASD_TASK), bench.image_root, tmp_path, cfg)
        assert not (tmp_path / f"{ASD_TASK}.parquet").exists()  # nothing to train "sefe" on
        rejects = REJECTS.read_records(tmp_path / f"{ASD_TASK}.rejects.parquet")
        assert rejects and all(r.retryable and r.raw_text for r in rejects), rejects[:1]
        if mode == "cut":  # named for what happened, with what to raise
            assert all(
                "finish_reason=length" in r.reason and "max_tokens_per_question" in r.reason for r in rejects
            )
        sent = fake.requests

        fake.mode = "good"  # the server is fixed: the rerun sends what was rejected, once
        res = run_asd(bench.task_file(ASD_TASK), bench.image_root, tmp_path, cfg)
        assert res.rejected == 0 and sha256_file(res.data_path) == asd_untouched
        assert 0 < fake.requests - sent <= len(rejects)
        sent = fake.requests
        assert run_asd(bench.task_file(ASD_TASK), bench.image_root, tmp_path, cfg).reused
        assert fake.requests == sent  # finished: nothing sent again


@pytest.mark.parametrize(
    ("mode", "named"),
    [
        ("http-400", r"refused all 3 requests of this shard; the first: HTTP 400: prompt is too long"),
        ("http-500", r"answered HTTP 500 to all 2 attempt\(s\): grammar rejected tokens \[0\]"),
        ("unknown-model", r"HTTP 404: The model `fake` does not exist\.; check asd.server"),
    ],
)
def test_a_server_that_refuses_every_request_is_a_named_error_with_its_message(
    small_run, tmp_path, mode, named
) -> None:
    """Issue 13: the server is up but answers every request the same way: that is neither
    "unavailable" nor a pile of rejects, and no Prefect retry is asked for."""
    from sefe_core.asd import run_asd
    from sefe_core.rewriter import RewriterRefused
    from tasks.steps import _rewriter_may_recover
    from tests.fake_rewriter import FakeRewriter

    _, bench, _ = small_run
    with FakeRewriter() as fake:
        fake.mode = mode
        with pytest.raises(RewriterRefused, match=named) as err:
            run_asd(bench.task_file(ASD_TASK), bench.image_root, tmp_path, _asd_cfg(fake.url))
        assert fake.requests <= 6  # stopped at the first shard (3 requests, 2 attempts each at most)

    class Failed:
        def result(self):
            raise err.value

    assert _rewriter_may_recover(None, None, Failed()) is False


def test_one_refused_request_rejects_its_rows_with_the_servers_reason(small_run, tmp_path) -> None:
    """A request over the server's context fails alone: its rows are rejected with the server's
    words, the rest of the shard is converted."""
    from data_contracts import REJECTS
    from sefe_core.asd import ASDConfig, run_asd
    from tests.fake_rewriter import FakeRewriter

    _, bench, _ = small_run
    with FakeRewriter() as fake:
        answer, seen = fake.answer, {"n": 0}

        def second_too_long(h, body) -> None:
            seen["n"] += 1
            fake.mode = "http-400" if seen["n"] == 2 else "good"
            answer(h, body)

        fake.answer = second_too_long
        cfg = _asd_cfg(fake.url, concurrency=1)
        cfg = ASDConfig(**{**cfg.model_dump(), "max_reject_fraction": 1.0})
        res = run_asd(bench.task_file(ASD_TASK), bench.image_root, tmp_path, cfg)
    (reject,) = REJECTS.read_records(res.rejects_path)
    assert reject.reason == "server refused the request: HTTP 400: prompt is too long for this model"
    assert res.rejected == 1 and res.converted == res.selected - 1


def test_rejects_under_the_limit_are_kept_and_a_pipeline_rerun_retries_them(
    small_run, asd_untouched, tmp_path
) -> None:
    """In `sefe run`: a few bad replies do not stop the run, but its stored ASD step asks for a
    rerun, which sends only those requests again (and retrains on the completed data)."""
    from flows.pipeline import finished_pipeline, sefe_pipeline
    from tests.fake_rewriter import FakeRewriter

    with FakeRewriter() as fake:
        broken = {"n": 0}
        answer = fake.answer

        def first_request_broken(h, body) -> None:
            broken["n"] += 1
            fake.mode = "not-json" if broken["n"] == 1 else "good"
            answer(h, body)

        fake.answer = first_request_broken
        sets = [f"benchmark.minicoin.tasks=[{ASD_TASK}]", "methods=[sefe]", "train.max_steps=1", "workers=0",
                "asd.backend=openai", "asd.percent=50", "asd.shard_size=3", f"asd.server.base_url={fake.url}",
                "asd.server.model=fake", "asd.server.concurrency=1", "asd.server.retries=1"]  # fmt: skip
        cfg = small_config(tmp_path, *sets)
        sefe_pipeline(cfg)
        data = cfg.run_dir / "data" / f"{ASD_TASK}.parquet"
        assert sha256_file(data) != asd_untouched  # one image's rows missing
        assert finished_pipeline(cfg) is None  # not shown as complete while rejects wait for a retry
        sent = fake.requests
        sefe_pipeline(cfg)
        assert fake.requests - sent == 1 and sha256_file(data) == asd_untouched
        assert finished_pipeline(cfg) is not None


def test_a_dripping_server_is_cut_off_at_its_deadline(small_run, tmp_path) -> None:
    import time

    from sefe_core.asd import run_asd
    from sefe_core.rewriter import RewriterUnavailable
    from tests.fake_rewriter import FakeRewriter

    _, bench, _ = small_run
    with FakeRewriter() as fake:
        fake.mode = "drip"  # one byte every 0.5 s: no single read waits past timeout_s
        t0 = time.monotonic()
        with pytest.raises(RewriterUnavailable, match=r"no complete reply within timeout_s=1 s"):
            run_asd(
                bench.task_file(ASD_TASK),
                bench.image_root,
                tmp_path,
                _asd_cfg(fake.url, timeout_s=1, retries=0),
            )
        assert time.monotonic() - t0 < 10  # 2 concurrent requests, 1 s each (was: hung for good)


def test_a_huge_reply_is_rejected_at_the_cap_not_read_whole(small_run, tmp_path) -> None:
    from data_contracts import REJECTS
    from sefe_core.asd import TooManyRejects, run_asd
    from tests.fake_rewriter import FakeRewriter

    _, bench, _ = small_run
    with FakeRewriter() as fake:
        fake.mode = "huge"  # 60 MB
        cfg = _asd_cfg(fake.url, concurrency=1)
        with pytest.raises(TooManyRejects, match="larger than asd.server.max_response_bytes=4000000"):
            run_asd(bench.task_file(ASD_TASK), bench.image_root, tmp_path, cfg)
        assert fake.sent_bytes < 20 * 2**20  # the client stopped reading near the cap
    rejects = REJECTS.read_records(tmp_path / f"{ASD_TASK}.rejects.parquet")
    assert all(r.retryable and len(r.raw_text) <= 2000 for r in rejects)
