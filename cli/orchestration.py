"""``strata deploy``, ``worker``, ``serve-flows``: running Strata's flows from Prefect."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from strata.cli.common import (
    WorkspaceOption,
    app,
    console,
)

LearnersOption = Annotated[
    list[str] | None,
    typer.Option(
        "--learner", help="a learner to deploy learn for (repeatable) [default: every learner of the workspace]"
    ),
]


PrefectFileOption = Annotated[
    Path | None, typer.Option(help="deployments file [default: the workspace's prefect.yaml, else Strata's own]")
]


GpuSlotsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="slots of the `gpu` concurrency limit: training processes at once [default: keep it, or 1 when missing]",
    ),
]


@app.command()
def deploy(
    learner: LearnersOption = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="work pool for every deployment [default: the one prefect.yaml names, `strata`; created if missing]"
        ),
    ] = None,
    gpu_slots: GpuSlotsOption = None,
    prefect_file: PrefectFileOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Create or update the prefect.yaml deployments on the Prefect API (PREFECT_API_URL).

    learn/<learner> runs nightly and on every `strata.batch.ingested` event for that learner, one run at a
    time per learner; benchmark/manual and export/manual run from the UI. Then start `strata worker`.
    """
    from strata.tasks.orchestration.runner import deploy as deploy_all

    for name in deploy_all(learner, pool, gpu_slots, workspace, prefect_file):
        console.print(f"[green]✓[/] deployment {name}")
    console.print("run them with: strata worker   (or: prefect worker start --pool strata)")


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="work pool to take runs from")] = "strata",
    limit: Annotated[int | None, typer.Option(help="most flow runs at once")] = None,
) -> None:
    """Run Prefect's process worker on the pool (`prefect worker start --pool NAME --type process`)."""
    from strata.tasks.orchestration.runner import worker as start_worker

    start_worker(pool, limit)


@app.command("serve-flows")
def serve_flows(
    learner: LearnersOption = None,
    gpu_slots: GpuSlotsOption = None,
    limit: Annotated[int | None, typer.Option(help="most flow runs at once")] = None,
    prefect_file: PrefectFileOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Serve the prefect.yaml deployments from this one process: schedules and triggers, no work pool."""
    from strata.tasks.orchestration.runner import serve_flows as serve_all

    serve_all(learner, gpu_slots, workspace, prefect_file, limit)
