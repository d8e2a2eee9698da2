"""``strata learn``, ``status``, ``promote``, ``rollback``: learning increments and moving the champion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from strata.cli.common import (
    WorkspaceOption,
    _increments_table,
    _json_option,
    _pct,
    _registered_version,
    app,
    console,
)
from strata.models.methods import method_entry


@app.command()
def learn(
    learner: Annotated[str, typer.Option(help="learner name (created on first use)")],
    method: Annotated[str | None, typer.Option(help="method on first learn [default: simplecil]")] = None,
    backbone: Annotated[str | None, typer.Option(help="backbone on first learn [default: tiny]")] = None,
    weights: Annotated[Path | None, typer.Option(help="local backbone weights file")] = None,
    config: Annotated[str | None, typer.Option(help="method-config overrides as JSON (first learn)")] = None,
    budget: Annotated[float, typer.Option(help="allowed drop on the champion's classes (0.05 = 5 points)")] = 0.05,
    floor: Annotated[float, typer.Option(help="minimum A_t for a champion")] = 0.0,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda … [default: cuda if available]")] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="data-parallel training processes per increment (one per GPU; gloo on CPU)")
    ] = 1,
    workspace: WorkspaceOption = None,
) -> None:
    """Learn every data version the learner has not learned yet (one increment each)."""
    from strata.flows.learn import LearnParams
    from strata.flows.learn import learn as learn_flow
    from strata.tasks.tracking.promotion import GateConfig

    if method is not None:
        method_entry(method)  # an unknown name fails here, not in a flow run
    params = LearnParams(
        learner=learner,
        method=method,
        backbone=backbone,
        weights=str(weights) if weights else None,
        config=_json_option(config),
        gate=GateConfig(old_accuracy_budget=budget, accuracy_floor=floor),
        seed=seed,
        device=device,
        processes=processes,
        workspace=str(workspace) if workspace else None,
    )
    try:
        result = learn_flow(params)
    except Exception as exc:  # what was learned before a later task failed; the error line follows
        for note in getattr(exc, "__notes__", []):
            console.print(note, highlight=False)
        raise
    if not result["learned"]:
        console.print(f"learner {learner!r} has nothing new to learn ({result['tasks']} tasks learned)")
    for item in result["learned"]:
        verdict = "promoted to champion" if item["promoted"] else "not promoted"
        console.print(
            f"learned {item['batch_id']} (task {item['task']}) → version {item['version']}: "
            f"A_t {_pct(item['accuracy'])}, {verdict}",
            highlight=False,
        )


@app.command()
def status(
    learner: Annotated[str | None, typer.Option(help="only this learner")] = None, workspace: WorkspaceOption = None
) -> None:
    """Learners, their increments (A_t, Ā, version), classes and champion."""
    from strata.tasks.tracking.champion import status as learner_status

    for item in learner_status(learner, workspace):
        console.print(_increments_table(item))


@app.command()
def promote(
    learner: Annotated[str, typer.Option(help="learner name")],
    version: Annotated[str, typer.Option(help="registered model version to make champion")],
    workspace: WorkspaceOption = None,
) -> None:
    """Move the learner's champion alias to VERSION by hand (recorded in the ledger)."""
    from strata.tasks.tracking.champion import promote as promote_version

    _registered_version(learner, version, "champion", workspace)  # names an unknown learner or version
    previous = promote_version(learner, version, workspace)
    console.print(f"champion of {learner}: v{previous} → v{version}")


@app.command()
def rollback(learner: Annotated[str, typer.Option(help="learner name")], workspace: WorkspaceOption = None) -> None:
    """Move the champion back to the version it pointed at before its last move."""
    from strata.tasks.tracking.champion import rollback as rollback_champion

    console.print(f"champion of {learner} rolled back to v{rollback_champion(learner, workspace)}")
