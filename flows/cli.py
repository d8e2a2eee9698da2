"""The ``strata`` command line: thin wrappers that call the flows and print their results."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from flows.profiles import UnknownProfileError
from models.backbones import TINY_BACKBONES, BackboneError
from models.methods import StateError, UnknownMethodError, available_methods, method_entry
from models.streams import StreamError
from tasks.datasets import DatasetError
from tasks.settings import SettingsError

app = typer.Typer(help="Strata: class-incremental learning on frozen pretrained ViTs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
USER_ERRORS = (UnknownProfileError, BackboneError, DatasetError, StreamError, UnknownMethodError, StateError,
               SettingsError, ValidationError)


def user_errors(command):
    """Show a user's mistake as one clear line and exit 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from exc

    return wrapper


@app.command()
@user_errors
def benchmark(
    method: Annotated[str | None, typer.Option(help="method name (see `strata methods`) [default: simplecil]")] = None,
    dataset: Annotated[str | None, typer.Option(help="digits | cifar100:DIR | folder:DIR | synthetic[:N]")] = None,
    base: Annotated[int | None, typer.Option(help="classes in the first task (0: one increment)")] = None,
    increment: Annotated[int | None, typer.Option(help="classes per task [default: 2]")] = None,
    backbone: Annotated[str | None, typer.Option(help="tiny (random-init) or a timm ViT name")] = None,
    weights: Annotated[Path | None, typer.Option(help="local backbone weights (.safetensors/.pth/.npz)")] = None,
    class_order: Annotated[str | None, typer.Option(help="seeded (np seed permutation) | natural")] = None,
    seed: Annotated[int | None, typer.Option(help="class-order and training seed [default: 1993]")] = None,
    epochs: Annotated[int | None, typer.Option(help="override the method's epochs per task")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (default: cuda if available)")] = None,
    config: Annotated[str | None, typer.Option(help='config overrides as JSON: {"train": {"epochs": 2}}')] = None,
    profile: Annotated[str | None, typer.Option(help="settings of an official run (see `strata profiles`)")] = None,
    out: Annotated[Path, typer.Option(help="output folder for metrics.json and the plots")] = Path("runs/benchmark"),
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Run one method over a class-incremental stream; print A_t, Ā and forgetting per task."""
    from flows.benchmark import BenchmarkParams, run_benchmark
    from flows.profiles import profile_params

    given = dict(method=method, dataset=dataset, base=base, increment=increment, backbone=backbone,
                 weights=str(weights) if weights else None, class_order=class_order, seed=seed, epochs=epochs,
                 device=device)
    fields = profile_params(profile) if profile else {}
    fields.update({k: v for k, v in given.items() if v is not None})
    if config:
        fields["overrides"] = {**fields.get("overrides", {}), **_json_option(config)}
    params = BenchmarkParams(out=out, **fields)
    if params.backbone in TINY_BACKBONES and params.weights is None:
        console.print(f"[yellow]note:[/] backbone {params.backbone!r} is RANDOMLY INITIALISED (no pretrained "
                      "weights): these numbers show the pipeline working, not what a pretrained ViT would reach.")
    method, dataset, base, increment = params.method, params.dataset, params.base, params.increment
    table = Table(title=f"{method} on {dataset} B{base}-Inc{increment}")
    for column in ("task", "A_t", "Ā", "forgetting", "old", "new"):
        table.add_column(column, justify="right")

    def add_row(t: int, summary: dict) -> None:
        old = summary["old_accuracy"][t]
        table.add_row(str(t + 1), _pct(summary["accuracy"][t]), _pct(summary["average_incremental_accuracy"]),
                      _pct(summary["forgetting"][t]), "–" if old is None else _pct(old),
                      _pct(summary["new_accuracy"][t]))
        console.print(f"task {t + 1}: A_t {_pct(summary['accuracy'][t])}")

    metrics = run_benchmark(params, on_task=add_row, show_progress=not quiet)
    console.print(table)
    console.print(f"final A {_pct(metrics['final_accuracy'])} · Ā {_pct(metrics['average_incremental_accuracy'])}"
                  f" · forgetting {_pct(metrics['final_forgetting'])} → {out}/metrics.json, "
                  f"{out}/accuracy_curve.png, {out}/accuracy_matrix.png")


@app.command()
def methods() -> None:
    """List the registered methods with what makes each different."""
    table = Table(title="methods")
    table.add_column("name")
    table.add_column("summary")
    for name in available_methods():
        table.add_row(name, method_entry(name).summary)
    console.print(table)


@app.command()
def profiles() -> None:
    """List the benchmark profiles that mirror the methods' official runs."""
    from flows.profiles import PROFILES

    table = Table(title="benchmark profiles (use with --profile NAME --dataset ... --weights ...)")
    for column in ("name", "method", "protocol", "backbone", "description"):
        table.add_column(column, no_wrap=column == "name")
    for name, p in sorted(PROFILES.items()):
        table.add_row(name, p["method"], f"B{p['base']}-Inc{p['increment']}", p["backbone"], p["description"])
    console.print(table)


def _json_option(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--config is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise typer.BadParameter("--config must be a JSON object")
    return value


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


if __name__ == "__main__":
    app()
