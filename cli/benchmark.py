"""``strata benchmark``, ``compare``, ``methods``, ``profiles``: running and comparing methods on a stream."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from strata.cli.common import (
    _int_list,
    _json_option,
    _pct,
    app,
    console,
)
from strata.models.backbones import TINY_BACKBONES
from strata.models.distributed import is_main_process
from strata.models.methods import available_methods, method_entry


@app.command()
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
    from strata.tasks.benchmarking.profiles import profile_params
    from strata.tasks.benchmarking.run import BenchmarkParams, run_benchmark

    given = dict(
        method=method,
        dataset=dataset,
        base=base,
        increment=increment,
        backbone=backbone,
        weights=str(weights) if weights else None,
        class_order=class_order,
        seed=seed,
        epochs=epochs,
        device=device,
    )
    fields = profile_params(profile) if profile else {}
    fields.update({k: v for k, v in given.items() if v is not None})
    if config:
        fields["overrides"] = {**fields.get("overrides", {}), **_json_option(config)}
    params = BenchmarkParams(out=out, **fields)
    method_entry(params.method)  # an unknown name fails before anything is printed
    if params.backbone in TINY_BACKBONES and params.weights is None:
        console.print(
            f"[yellow]note:[/] backbone {params.backbone!r} is RANDOMLY INITIALISED (no pretrained "
            "weights): these numbers show the pipeline working, not what a pretrained ViT would reach."
        )
    method, dataset, base, increment = params.method, params.dataset, params.base, params.increment
    table = Table(title=f"{method} on {dataset} B{base}-Inc{increment}")
    for column in ("task", "A_t", "Ā", "forgetting", "old", "new"):
        table.add_column(column, justify="right")

    def add_row(t: int, summary: dict) -> None:
        old = summary["old_accuracy"][t]
        table.add_row(
            str(t + 1),
            _pct(summary["accuracy"][t]),
            _pct(summary["average_incremental_accuracy"]),
            _pct(summary["forgetting"][t]),
            "–" if old is None else _pct(old),
            _pct(summary["new_accuracy"][t]),
        )
        console.print(f"task {t + 1}: A_t {_pct(summary['accuracy'][t])}")

    metrics = run_benchmark(params, on_task=add_row, show_progress=not quiet)
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    console.print(table)
    console.print(
        f"final A {_pct(metrics['final_accuracy'])} · Ā {_pct(metrics['average_incremental_accuracy'])}"
        f" · forgetting {_pct(metrics['final_forgetting'])} → {out}/metrics.json, "
        f"{out}/accuracy_curve.png, {out}/accuracy_matrix.png"
    )


@app.command()
def compare(
    methods: Annotated[str, typer.Option(help="comma-separated method names")] = "simplecil,finetune",
    dataset: Annotated[str, typer.Option(help="digits | cifar100:DIR | folder:DIR | synthetic[:N]")] = "digits",
    base: Annotated[int, typer.Option(help="classes in the first task (0: one increment)")] = 0,
    increment: Annotated[int, typer.Option(help="classes per task")] = 2,
    backbone: Annotated[str, typer.Option(help="tiny (random-init) or a timm ViT name")] = "tiny",
    weights: Annotated[Path | None, typer.Option(help="local backbone weights")] = None,
    seed: Annotated[int, typer.Option(help="class-order and training seed")] = 1993,
    seeds: Annotated[
        str | None, typer.Option(help="comma-separated seeds to run every method with [default: --seed]")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="override every method's epochs per task")] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="fan the runs out over this Dask scheduler (tcp://host:8786)")
    ] = None,
    dask_workers: Annotated[
        int,
        typer.Option(min=0, help="or over a local Dask cluster of N worker processes [default: 0, one run at a time]"),
    ] = 0,
    out: Annotated[Path, typer.Option(help="output folder (METHOD/seed-SEED sub-folders)")] = Path("runs/compare"),
    workspace: Annotated[
        Path | None,
        typer.Option("--workspace", "-w", help="whose MLflow store to log to [default: the current folder]"),
    ] = None,
) -> None:
    """The benchmark flow: methods × seeds on the same stream, one MLflow run each, a comparison table."""
    from strata.flows.benchmark import CompareParams
    from strata.flows.benchmark import benchmark as benchmark_flow

    rows = benchmark_flow(
        CompareParams(
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            dataset=dataset,
            base=base,
            increment=increment,
            backbone=backbone,
            weights=str(weights) if weights else None,
            seed=seed,
            seeds=_int_list(seeds, "--seeds") if seeds else None,
            epochs=epochs,
            dask_address=dask_address,
            dask_workers=dask_workers,
            out=out,
            workspace=str(workspace) if workspace else None,
        )
    )
    table = Table(title=f"{dataset} B{base}-Inc{increment} on {backbone}")
    for column in rows[0]:
        table.add_column(column.replace("_", " "), justify="right", no_wrap=column == "method")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


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
    from strata.tasks.benchmarking.profiles import PROFILES

    table = Table(title="benchmark profiles (use with --profile NAME --dataset ... --weights ...)")
    for column in ("name", "method", "protocol", "backbone", "description"):
        table.add_column(column, no_wrap=column == "name")
    for name, p in sorted(PROFILES.items()):
        table.add_row(name, p["method"], f"B{p['base']}-Inc{p['increment']}", p["backbone"], p["description"])
    console.print(table)
