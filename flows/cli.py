"""`sefe` command line. Local invocation needs no running Prefect server."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from sefe_core.config import load_config

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
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        console.print("[red]Invalid config:[/]\n" + "\n".join(lines))
    except (ValueError, OSError) as e:
        console.print(f"[red]Invalid config:[/] {e}")
    raise typer.Exit(2)


@app.command()
def run(config: Path | None = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """The main job on the embedded default: build MiniCoIN, pre-train the tiny base model, and show
    its zero-shot answers and held-out pre-training loss."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sefe_core.prepare import ensure_base_model, ensure_benchmark, zero_shot_preview
    from sefe_core.registry import task_spec

    cfg = _config(config, set_)
    t0 = time.perf_counter()
    console.rule(f"[bold]SEFE run: {cfg.experiment}")
    with console.status("Generating the benchmark..."):
        bench = ensure_benchmark(cfg)
    mc = cfg.benchmark.minicoin
    how = "reused" if bench.reused else f"built in {bench.seconds:.1f} s"
    console.print(
        f"Benchmark [bold]{bench.name}[/]: {len(bench.tasks)} tasks x ({mc.n_train} train + "
        f"{mc.n_test} test), {how} -> {bench.dir}"
    )
    t = Table("task", "CoIN task", "native style", "scorer")
    for name in bench.tasks:
        s = task_spec(cfg.benchmark.name, name)
        t.add_row(s.name, s.coin_name, s.native_style, s.scorer)
    console.print(t)

    console.print("Pre-training the tiny base model (all parameters)..." if cfg.model.kind == "tiny" else "")
    base = ensure_base_model(cfg)
    if cfg.model.kind == "tiny":
        how = "reused from cache" if base.reused else f"pre-trained in {base.pretrain_seconds:.0f} s"
        console.print(f"Base model {how} -> {base.path}")
        console.print(
            f"Held-out pre-training loss: {base.heldout_loss_before:.3f} (untrained) -> "
            f"[bold]{base.heldout_loss_after:.3f}[/] (pre-trained)"
        )

    with console.status("Zero-shot answers of the base model..."):
        rows = zero_shot_preview(cfg, bench, base)
    t = Table(
        "task", "question (first line)", "reference", "base model answer", title="Zero-shot, before any task"
    )
    for r in rows:
        t.add_row(r.task, r.question.split("\n")[0][:48], r.reference, r.prediction or "<empty>")
    console.print(t)
    console.print(f"Done in {time.perf_counter() - t0:.0f} s. Outputs under [bold]{cfg.run_dir}[/].")
