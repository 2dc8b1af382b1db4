"""`sefe` command line. Local invocation needs no running Prefect server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# Before anything imports Prefect: its local server's first start (creating its database) takes
# 20-30 s on 2 cores, over Prefect's 20 s default, and its telemetry writes race that database
# ("database is locked" tracebacks on a first run). A user's own settings win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table

from sefe_core.config import load_config  # noqa: E402

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="SEFE: continual instruction tuning without forgetting."
)
console = Console()


@app.callback()
def main() -> None:
    """SEFE: continual instruction tuning of vision-language models without forgetting."""


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run config (see configs/ in the README).")
SetOpt = typer.Option([], "--set", "-s", help="Override a config field: key.sub=value (repeatable).")


def _config(path: Path | None, overrides: list[str]):
    """Load the run config; a bad file or override is a one-line error, not a traceback."""
    from pydantic import ValidationError

    try:
        return load_config(path, overrides)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or '(config)'}: {err['msg']}" for err in e.errors()]
        console.print("[red]Invalid config:[/]\n" + "\n".join(lines))
    except (ValueError, OSError) as e:
        console.print(f"[red]Invalid config:[/] {e}")
    raise typer.Exit(2)


def _interruptible(flow_call):  # noqa: ANN001, ANN202
    """Run a flow so that Ctrl-C and SIGTERM stop it within seconds, leaving nothing behind.

    The flow runs in a thread under this run's own temporary Prefect server (flows/server.py:
    outside the terminal's process group, gone with the run); the main thread only waits, so
    the signal handlers below run at once. They kill the worker processes and the server and
    exit: every finished step is stored and training resumes from its last checkpoint, so
    `sefe run` again continues where this one stopped (as after kill -9)."""
    import contextvars
    import logging
    import signal
    import threading

    from flows import server
    from sefe_core import rewriter_server, workers

    def stop(signum: int, frame: object) -> None:
        console.print(
            f"\n[yellow]{signal.Signals(signum).name}: stopping the run[/] (workers, servers). "
            "Finished steps are kept: run the same command again to resume."
        )
        logging.disable(logging.CRITICAL)  # the steps the kill interrupts would log it as their failure
        workers.kill()
        server.stop()
        rewriter_server.stop_servers()
        os._exit(128 + signum)

    # the pool's semaphores are the resource tracker's to remove once the workers are killed; its
    # "leaked semaphore" warning at that moment is expected, not news
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), quiet) if w)
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = flow_call()
        except BaseException as e:  # re-raised in the main thread
            outcome["error"] = e

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server.local_server():
            # in this context: the server's PREFECT_API_URL is a context setting, not inherited by threads
            context = contextvars.copy_context()
            thread = threading.Thread(target=context.run, args=(target,), name="sefe-flow", daemon=True)
            thread.start()
            while thread.is_alive():
                thread.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


DISK_FULL_BELOW = 64 * 2**20  # free bytes under which a failed write is taken for a full disk


def _known_failure(e: BaseException, run_dir: Path) -> str | None:
    """The one-line reason of a failure the user can act on (a full disk, a rewriter that cannot
    do its job, training that diverged), else None (a bug: its traceback is the report)."""
    import errno
    import shutil

    from sefe_core.asd import TooManyRejects
    from sefe_core.rewriter import RewriterError
    from sefe_core.trainer import NonFiniteTraining

    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    probe = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    # torch.save says only "enforce fail at inline_container.cc" when the disk is full: look
    if free < DISK_FULL_BELOW or any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain):
        return (
            f"the disk holding {run_dir} is full ({free / 2**20:.0f} MiB free; the write that failed: "
            f"{type(chain[0]).__name__}: {str(chain[0])[:200]}). Free some space."
        )
    known = (TooManyRejects, RewriterError, NonFiniteTraining)
    return next((str(x) for x in chain if isinstance(x, known)), None)


def _writes_run_dir(fn):  # noqa: ANN001, ANN202
    """A command that writes under the run directory holds its lock while it runs (as `sefe run`
    and `sefe train` do): a second writer on the same directory stops at once, with who holds it."""
    import functools

    @functools.wraps(fn)
    def locked(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        from sefe_core.runlock import RunDirectoryBusy, run_lock

        run_dir = kwargs.get("run_dir") or _config(kwargs.get("config"), kwargs.get("set_") or []).run_dir
        try:
            with run_lock(run_dir):
                return fn(*args, **kwargs)
        except RunDirectoryBusy as e:
            console.print(f"[red]{e}[/]")
            raise typer.Exit(1) from None

    return locked


def _run_flow(flow_call, where: Path, what: str):  # noqa: ANN001, ANN202
    """`_interruptible(flow_call)`, with the failures a user can act on (a busy run directory, a
    full disk, a rewriter that cannot work) as one line and exit code 1, not a traceback."""
    from sefe_core.runlock import RunDirectoryBusy

    try:
        return _interruptible(flow_call)
    except RunDirectoryBusy as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    except Exception as e:
        why = _known_failure(e, where)
        if why is None:
            raise
        console.print(
            f"[red]{what} stopped:[/] {why}\nFinished steps are kept: rerun the same command to resume."
        )
        raise typer.Exit(1) from None


@app.command()
def run(config: Path | None = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """The main job: the SEFE pipeline flow (benchmark, base model, ASD, every method over the
    task sequence, evaluation after each task, comparison report), on the embedded default unless
    a config says otherwise. Runs locally (Prefect's temporary server); a finished run is shown
    from its stored results in seconds, a crashed one resumes where it stopped."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = _config(config, set_)
    from flows.pipeline import finished_pipeline

    t0 = time.perf_counter()
    console.rule(f"[bold]SEFE run: {cfg.experiment}  ({', '.join(cfg.methods)} on {cfg.benchmark.name})")
    out = finished_pipeline(cfg)
    if out is not None:
        work = {"train_steps": 0, "generations": 0}
        console.print(f"Run already complete for this config: every step is cached under {cfg.run_dir}.")
    else:
        from flows.pipeline import sefe_pipeline
        from sefe_core.progress import quiet_libraries

        quiet_libraries()  # imports transformers: only when something will run

        console.print(
            f"Running the pipeline under [bold]{cfg.run_dir}[/] (Prefect logs each step; "
            "steps finished earlier are cache hits)."
        )
        out = _run_flow(lambda: sefe_pipeline(cfg), cfg.run_dir, "Run")
        work = out["work"]
    _metrics_table(Path(out["metrics"]))
    console.print(
        f"Work done now: {work['train_steps']} training steps, {work['generations']} generations. "
        f"Done in {time.perf_counter() - t0:.0f} s."
    )
    console.print(f"Report: [bold]{Path(out['dir']) / 'report.md'}[/] (plots and metrics.json next to it)")


AxisOpt = typer.Option(
    [], "--axis", "-a", help="A sweep axis: field=v1,v2,... (repeatable; `seed=0,1,2` sets every seed)."
)
AxesFileOpt = typer.Option(None, "--axes", help="YAML file of axes: field -> list of values.")
SweepDirOpt = typer.Option(
    None, "--sweep-dir", help="Where the points go (default: <runs_root>/<experiment>-sweep)."
)


@app.command()
def sweep(
    config: Path | None = ConfigOpt,
    set_: list[str] = SetOpt,
    axis: list[str] = AxisOpt,
    axes_file: Path | None = AxesFileOpt,
    sweep_dir: Path | None = SweepDirOpt,
) -> None:
    """A sweep: the pipeline at every point of the axes' product over the base config (the config
    file and --set), each point a run directory of its own, every step shared between points
    whose keys agree (ASD once per X, task 1 once per method and data). Writes a report with one
    table (point x metrics), a plot per axis and the count of steps run and reused."""
    from sefe_core import sweep as sw

    cfg = _config(config, set_)
    try:
        axes = sw.load_axes(axes_file) if axes_file else {}
        for field, values in sw.values_of(axis).items():
            if field in axes:
                raise ValueError(f"axis {field} is both in {axes_file} and given with --axis")
            axes[field] = values
        where = sweep_dir.absolute() if sweep_dir else sw.default_sweep_dir(cfg)
        points = sw.expand(cfg, axes, where)
    except (ValueError, OSError) as e:
        console.print(f"[red]Invalid sweep:[/] {e}")
        raise typer.Exit(2) from None
    from flows.sweep import sefe_sweep
    from sefe_core.progress import quiet_libraries

    quiet_libraries()
    t0 = time.perf_counter()
    console.rule(f"[bold]SEFE sweep: {len(points)} points over {', '.join(axes)}")
    for p in points:
        console.print(f"  {p.name}")
    out = _run_flow(lambda: sefe_sweep(cfg, axes, str(where)), where, "Sweep")
    steps = out["steps"]
    console.print(
        f"Steps: {steps['run']} ran, {steps['reused']} reused from the cache "
        f"({steps['shared']} finished by another point). Done in {time.perf_counter() - t0:.0f} s."
    )
    console.print(f"Report: [bold]{out['report']}[/] (points.parquet and a plot per axis next to it)")


@app.command()
@_writes_run_dir
def prepare(config: Path | None = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Build (or load) the benchmark and the base model and show the base model's zero-shot
    answers: a look at the ground a run stands on, without training anything."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sefe_core.prepare import ensure_base_model, ensure_benchmark, task_counts, zero_shot_preview
    from sefe_core.registry import task_spec

    cfg = _config(config, set_)
    with console.status("Preparing the benchmark..."):
        bench = ensure_benchmark(cfg)
    how = "reused" if bench.reused else f"built in {bench.seconds:.1f} s"
    console.print(f"Benchmark [bold]{bench.name}[/]: {len(bench.tasks)} tasks, {how} -> {bench.dir}")
    t = Table(
        "task", "CoIN task", "native style", "scorer", "train", "test", "rejected", "top reject reasons"
    )
    for name, n in task_counts(bench).items():
        s = task_spec(cfg.benchmark.name, name)
        reasons = ", ".join(f"{why} ({k})" for why, k in n["reasons"].items())
        t.add_row(
            s.name, s.coin_name, s.native_style, s.scorer, str(n["train"]), str(n["test"]), str(n["rejected"]),
            reasons or "-",
        )  # fmt: skip
    console.print(t)
    unknown = (bench.counts or {}).get("unknown_folders")
    if unknown:
        console.print(f"[yellow]Folders that are no CoIN task (not loaded):[/] {', '.join(unknown)}")
    base = ensure_base_model(cfg)
    if cfg.model.kind == "tiny":
        how = {"shipped": "the copy shipped in the repository", "built": "built here"}.get(
            base.origin, base.origin
        )
        when = "reused from cache" if base.reused else f"pre-trained in {base.pretrain_seconds:.0f} s"
        console.print(f"Base model: {how}, {when} -> {base.path}")
        _base_summary(base.path)
    with console.status("Zero-shot answers of the base model..."):
        rows = zero_shot_preview(cfg, bench, base)
    t = Table(
        "task",
        "question (first line)",
        "reference",
        "base model answer",
        "format",
        "score",
        title="Zero-shot",
    )
    for r in rows:
        t.add_row(
            r.task, r.question.split("\n")[0][:44], r.reference, r.prediction or "<empty>",
            "ok" if r.format_ok else "-", f"{r.score:.2f}",
        )  # fmt: skip
    console.print(t)


BaseOutOpt = typer.Option(Path("sefe_core/assets/tiny-llava"), "--out", help="Where to write the model.")


@app.command("build-base")
def build_base(out: Path = BaseOutOpt, config: Path | None = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Build and pre-train the tiny base model (vision stage, then instructions) from the config's
    `model.tiny` section into OUT. The default OUT is the copy shipped in the repository, which
    `sefe run` uses when its config is the shipped one: this is the command that rebuilds it."""
    from sefe_core.tiny_vlm import build_tiny_vlm

    cfg = _config(config, set_)
    t0 = time.perf_counter()
    path = build_tiny_vlm(out, cfg.model.tiny)
    _base_summary(path)
    console.print(f"Built in {time.perf_counter() - t0:.0f} s -> [bold]{path}[/]")


def _base_summary(path: Path) -> None:
    """The build record of a tiny base: held-out loss, and the probe against chance."""
    import json

    info = json.loads((Path(path) / "pretrain.json").read_text())
    console.print(
        f"Held-out pre-training loss {info['heldout_loss_before']:.3f} -> [bold]{info['heldout_loss_after']:.3f}[/]"
        f"; {info['parameters']:,} parameters"
    )
    if info.get("probe"):
        t = Table("probe (generic questions)", "accuracy", "chance", title="What the base model sees")
        for kind, v in info["probe"].items():
            t.add_row(kind, f"{100 * v['accuracy']:.0f}%", f"{100 * v['chance']:.0f}%")
        console.print(t)


def _metrics_table(metrics_json: Path) -> None:
    """The methods x metrics table of a comparison report (percent)."""
    from rich import box

    from sefe_core.analysis import headline_rows, metrics_summary

    rows = headline_rows(metrics_summary(metrics_json))
    t = Table(
        "method", "stages", "MFT", "MFN", "MAA", "BWT", "superficial", "essential",
        title="Accuracy (%); mean forgetting split into superficial / essential",
        box=box.SIMPLE_HEAD,  # no column rules: fits an 80-column terminal with every header whole
        collapse_padding=True,
        pad_edge=False,
    )  # fmt: skip
    for row in rows:
        t.add_row(
            *("n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values())
        )
    console.print(t)


MatrixArg = typer.Argument(..., help="Matrix CSV: row i = stage after task i, column j = task j.")
JsonOpt = typer.Option(False, "--json", help="Print the metrics as JSON (for machines).")
RunDirOpt = typer.Option(None, "--run-dir", help="Run directory (default: the config's run_dir).")
MethodOpt = typer.Option([], "--method", "-m", help="Only these methods (repeatable).")


@app.command()
def metrics(matrix: Path = MatrixArg, as_json: bool = JsonOpt) -> None:
    """Recompute MFT, MFN, MAA and BWT from an accuracy (or format / content) matrix file.

    Blank cells above the diagonal; an optional header names the tasks and an optional first
    column labels the stages. Values are used as given (fractions or percentages)."""
    import json

    from sefe_core.metrics import MatrixError, cl_metrics, read_matrix_csv

    try:
        a, tasks = read_matrix_csv(matrix)
    except (MatrixError, OSError) as e:
        console.print(f"[red]Bad matrix:[/] {e}")
        raise typer.Exit(2) from None
    values = cl_metrics(a, tasks)
    if as_json:
        typer.echo(json.dumps({"matrix": str(matrix), "tasks": a.shape[0], **values}, indent=2))
        return
    t = Table("metric", "value", title=f"{matrix.name}: {a.shape[0]} task(s)")
    for name, v in values.items():
        t.add_row(name, "n/a (needs >= 2 tasks)" if v is None else f"{v:.4f}")
    console.print(t)


@app.command()
@_writes_run_dir
def report(
    run_dir: Path | None = RunDirOpt,
    method: list[str] = MethodOpt,
    config: Path | None = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Write the run report (markdown, PNG plots, metrics.json) from the methods' predictions."""
    from sefe_core.metrics import MatrixError
    from sefe_core.report import build_report

    root = run_dir if run_dir is not None else _config(config, set_).run_dir
    try:
        out = build_report(root, methods=method or None)
    except (MatrixError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]Cannot build the report:[/] {e}")
        raise typer.Exit(2) from None
    _metrics_table(out / "metrics.json")
    console.print(f"Report: [bold]{out / 'report.md'}[/] (per method: <run_dir>/<method>/report/)")


EvalMethodOpt = typer.Option(
    [], "--method", "-m", help="Only these methods (repeatable); default: all trained."
)


@app.command("eval")
@_writes_run_dir
def eval_(
    method: list[str] = EvalMethodOpt, config: Path | None = ConfigOpt, set_: list[str] = SetOpt
) -> None:
    """Evaluate every trained stage of the methods in the run directory (after task k: tasks
    1..k) into <run_dir>/<method>/task-<name>/predictions.parquet: the evaluation steps of the
    pipeline's DAG, run here. Stages evaluated under the same key (sefe_core/keys.py: eval
    settings, base, adapters 1..k, test records) are kept; `sefe report` then builds the report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows.pipeline import MethodRun, asd_dag, prepare_dag
    from sefe_core.methods import uses_asd
    from sefe_core.progress import quiet_libraries
    from tasks.caching import NotCached, cached_step

    cfg = _local(_config(config, set_))
    quiet_libraries()
    methods = method or [m for m in cfg.methods if (cfg.run_dir / m).is_dir()]
    if not methods:
        console.print(f"[red]Nothing trained under {cfg.run_dir}[/]: run `sefe train` or `sefe run` first.")
        raise typer.Exit(2)
    runner, ran = _recording_runner()
    bench, base = prepare_dag(cfg, runner)
    t = Table("method", "stage", "task", "predictions", "mean score", "")
    for m in methods:
        try:
            data = asd_dag(cfg, bench, cached_step) if uses_asd(m) else None
        except NotCached:
            data = None
        r = MethodRun(cfg, m, bench, base, data)
        for k, task in enumerate(bench["tasks"], start=1):
            try:  # a stage is trained when its train step's result is stored (by `sefe train`/`run`)
                tr = r.train(k, task, cached_step) if data is not None or not uses_asd(m) else None
            except NotCached:
                tr = None
            if tr is None:
                if k == 1:
                    console.print(f"[yellow]{m}: no finished task under {cfg.run_dir / m}[/]")
                break
            r.after_task(k, task, tr, runner)
            with console.status(f"{m}: stage {k} on tasks 1..{k}..."):
                r.evaluate(k, task, runner)
            out = r.evals[-1]
            kept = ran[-1] == ("evaluate", k, True)
            mean = "" if kept else f"{_mean_score(out['path']):.3f}"
            t.add_row(m, str(k), task, out["path"], mean, "kept" if kept else "")
    console.print(t)
    console.print("Next: [bold]sefe report[/] builds the accuracy matrices, metrics and plots.")


def _local(cfg):
    """CLI commands run their steps in this process unless the config asks for worker processes."""
    return cfg if cfg.workers is not None else cfg.model_copy(update={"workers": 0})


def _recording_runner():
    """`local_step`, noting per call (step, k, whether its stored result was reused)."""
    from tasks.caching import NotCached, cached_step, run_here

    ran: list[tuple[str, int, bool]] = []

    def run(t, run_dir, k, key, **kwargs):
        try:
            out = cached_step(t, run_dir, k, key)
            ran.append((t.name, k, True))
            return out
        except NotCached:
            ran.append((t.name, k, False))
            return run_here(t, run_dir, k, key, **kwargs)

    _log_to_console()
    return run, ran


def _log_to_console() -> None:
    """The steps' log lines (what a flow shows in Prefect's log) on the console."""
    import logging

    from rich.logging import RichHandler

    log = logging.getLogger("sefe")
    if not log.handlers:
        log.addHandler(RichHandler(console=console, show_path=False, show_time=False))
        log.setLevel(logging.INFO)
        log.propagate = False  # not a second time through Prefect's console handler


def _mean_score(predictions: str) -> float:
    import pyarrow.parquet as pq

    scores = pq.read_table(predictions, columns=["score"]).column("score").to_pylist()
    return sum(scores) / max(len(scores), 1)


def _plain(message: str) -> None:
    """A line as it is (a server command holds brackets that are not rich markup)."""
    console.print(message, markup=False, highlight=False)


AsdTaskOpt = typer.Option([], "--task", "-t", help="Only this task (repeatable); default: all.")


@app.command()
@_writes_run_dir
def asd(config: Path | None = ConfigOpt, set_: list[str] = SetOpt, task: list[str] = AsdTaskOpt) -> None:
    """ASD: rewrite asd.percent% of every task's training records into the answer styles it does not
    use (backend `rules`, or `openai` for a served model) into <run_dir>/data/<task>.parquet + rejects."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sefe_core.asd import TooManyRejects, run_asd, task_styles
    from sefe_core.prepare import ensure_benchmark
    from sefe_core.registry import task_spec
    from sefe_core.rewriter import RewriterError
    from sefe_core.rewriter_server import stop_servers

    cfg = _config(config, set_)
    a = cfg.asd
    bench = ensure_benchmark(cfg)
    unknown = [t for t in task if t not in bench.tasks]
    if unknown:
        console.print(f"[red]Unknown task(s)[/] {unknown}; tasks: {list(bench.tasks)}")
        raise typer.Exit(2)
    out = cfg.run_dir / "data"
    backend = (
        "rules (no model)" if a.backend == "rules" else f"openai: {a.server.model} at {a.server.base_url}"
    )
    console.rule(f"[bold]ASD: {a.percent:g}% of each task's train records, seed {a.seed}, backend {backend}")
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            for name in list(task) or list(bench.tasks):
                tid = bar.add_task(f"ASD {name} (shards)", total=None)

                def shard_done(done: int, total: int, tid=tid) -> None:
                    bar.update(tid, completed=done, total=total)

                results.append(
                    run_asd(
                        bench.task_file(name),
                        bench.image_root,
                        out,
                        a,
                        benchmark=cfg.benchmark.name,
                        progress=shard_done,
                        say=_plain,  # a launched rewriter server's start-up
                    )
                )
    except (RewriterError, TooManyRejects) as e:
        console.print(f"[red]ASD stopped:[/] {e}")
        raise typer.Exit(1) from None
    finally:
        stop_servers(say=_plain)
    t = Table("task", "converted into", "selected", "converted", "rejected", "shards (reused)", "s")
    for r in results:
        styles = ", ".join(task_styles(task_spec(cfg.benchmark.name, r.task), a.recipe))
        shards = "finished earlier" if r.reused else f"{r.shards} ({r.shards_reused})"
        t.add_row(
            r.task, styles, str(r.selected), str(r.converted), str(r.rejected), shards, f"{r.seconds:.1f}"
        )
    console.print(t)
    sel, conv, rej = (sum(getattr(r, k) for r in results) for k in ("selected", "converted", "rejected"))
    console.print(f"selected {sel} = converted {conv} + rejected {rej}")
    for r in results:
        for reason, n in list(r.reasons.items())[:3]:
            console.print(f"  {r.task}: {n} rejected: {reason}")
    console.print(
        f"Outputs: [bold]{out}[/]/<task>.parquet, <task>.rejects.parquet (shards under {out / 'shards'})"
    )


MethodOpt = typer.Option("reglora", "--method", "-m", help="A method or variant (`sefe methods` lists them).")
UntilOpt = typer.Option(None, "--until", "-u", help="Train the sequence up to this task (default: all).")
ExportOpt = typer.Option(None, "--export", help="Also write the merged model after the last task here.")


@app.command("methods")
def list_methods() -> None:
    """The registered continual methods (sefe_core/methods/) and the variant names built on them."""
    from sefe_core.methods import ASD_SUFFIX, REGISTRY, SHORTHANDS

    t = Table(
        "method", "what it adds to a fresh LoRA per task", "saves after a task", title="Continual methods"
    )
    for name, m in REGISTRY.items():
        t.add_row(name, m.summary, m.artifact or "-")
    console.print(t)
    short = ", ".join(f"{k} = {v}" for k, v in SHORTHANDS.items())
    console.print(f"Any method on the ASD output: <method>{ASD_SUFFIX}; shorthands: {short}.")


@app.command()
def train(
    method: str = MethodOpt,
    until: str | None = UntilOpt,
    export: Path | None = ExportOpt,
    config: Path | None = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Continual training: one fresh LoRA per task on the model holding the earlier tasks, with the
    method's penalty (ASD first for a method on ASD data): the training steps of the pipeline's
    DAG, run here, without evaluation. Leaves <run_dir>/<method>/task-<name>/{adapter/, train.json,
    ...}; finished tasks are reused, an interrupted task resumes from its last checkpoint."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows.pipeline import MethodRun, asd_dag, prepare_dag
    from sefe_core.methods import uses_asd, variant
    from sefe_core.progress import quiet_libraries
    from sefe_core.runlock import RunDirectoryBusy, run_lock
    from sefe_core.stage import export_merged

    cfg = _local(_config(config, set_))
    try:
        variant(method)
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    if cfg.model.kind == "pretrained" and cfg.train.preset == "minicoin":
        console.print(
            "[yellow]train.preset is 'minicoin' for a pretrained model; set train.preset=reference?[/]"
        )
    quiet_libraries()
    t0 = time.perf_counter()
    runner, ran = _recording_runner()
    try:
        with run_lock(cfg.run_dir):
            with console.status("Preparing the benchmark and the base model..."):
                bench, base = prepare_dag(cfg, runner)
            if until is not None and until not in bench["tasks"]:
                console.print(f"[red]Unknown task {until!r}[/]; tasks: {', '.join(bench['tasks'])}")
                raise typer.Exit(2)
            names = bench["tasks"][: bench["tasks"].index(until) + 1] if until else bench["tasks"]
            data = asd_dag(cfg, bench, runner) if uses_asd(method) else None
            console.rule(f"[bold]Training {method}: {len(names)} tasks")
            r = MethodRun(cfg, method, bench, base, data)
            table = Table("task", "steps", "samples", "final loss", "", title=method)
            for k, task in enumerate(names, start=1):
                tr = r.train(k, task, runner)
                r.after_task(k, task, tr, runner)
                info = json.loads((Path(tr["task_dir"]) / "train.json").read_text())
                reused = next(kept for name, i, kept in reversed(ran) if name == "train" and i == k)
                table.add_row(
                    task, str(info["global_step"]), str(info["train_samples"]), f"{info['final_loss']:.3f}",
                    "reused" if reused else f"trained in {info['seconds']:.1f} s",
                )  # fmt: skip
    except RunDirectoryBusy as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    console.print(table)
    if export is not None:
        with console.status(f"Writing the merged model after {names[-1]}..."):
            export_merged(base["path"], [d["train"]["task_dir"] for d in r.done], export)
        console.print(f"Merged model -> [bold]{export}[/]")
    console.print(
        f"Done in {time.perf_counter() - t0:.0f} s. Outputs under [bold]{cfg.run_dir / method}[/]/task-<name>/"
    )


LlmOpt = typer.Option(..., help="Vicuna-7B-v1.5 directory (HF Llama: config, tokenizer, weights).")
VisionOpt = typer.Option(..., help="CLIP ViT-L/14-336 directory (HF CLIP, preprocessor_config.json).")
ProjectorOpt = typer.Option(..., help="LLaVA-1.5 pre-training mm_projector.bin.")
OutOpt = typer.Option(..., help="Where to write the llava-hf model directory.")
DtypeOpt = typer.Option("float16", help="Weights dtype: float16, bfloat16 or float32.")


@app.command()
def assemble(
    llm: Path = LlmOpt,
    vision: Path = VisionOpt,
    projector: Path = ProjectorOpt,
    out: Path = OutOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Assemble LLaVA-1.5 from its three published parts into a llava-hf directory, as CoIN starts
    from (loads .bin files with torch's weights-only loader: no pickled code runs). Then use it
    with --set model.kind=pretrained --set model.path=OUT."""
    import torch

    from sefe_core.assemble import AssemblyError, assemble_llava

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in dtypes:
        console.print(f"[red]Unknown dtype {dtype!r}[/]; one of {', '.join(dtypes)}")
        raise typer.Exit(2)
    t0 = time.perf_counter()
    try:
        with console.status("Assembling LLaVA-1.5 from its parts..."):
            path = assemble_llava(llm, vision, projector, out, dtype=dtypes[dtype])
    except (AssemblyError, FileNotFoundError, FileExistsError) as e:
        console.print(f"[red]Cannot assemble:[/] {e}")
        raise typer.Exit(2) from None
    console.print(f"LLaVA-1.5 -> [bold]{path}[/] in {time.perf_counter() - t0:.0f} s")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context, pool: str = typer.Option("sefe-process", "--pool", "-p", help="Work pool.")
) -> None:
    """`prefect worker start --pool POOL` for the deployments (extra options pass through), with a
    Ctrl-C that stops it: the flow runs in flight are cancelled (rerun to resume), then the worker
    exits. Prefect 3.8's own worker ignores a first Ctrl-C."""
    from flows.worker import run_worker

    raise typer.Exit(run_worker(pool, list(ctx.args), say=lambda m: console.print(f"[yellow]{m}[/]")))
