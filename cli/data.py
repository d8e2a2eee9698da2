"""``strata init``, ``ingest``, ``data list|show`` and ``db upgrade|downgrade|current``: workspaces and data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from strata.cli.common import (
    WorkspaceOption,
    _class_counts,
    app,
    console,
    data_app,
    db_app,
)
from strata.tasks.workspace.setup import workspace_settings


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="workspace folder (created if missing)")] = Path("."),
    remote: Annotated[str | None, typer.Option(help="DVC remote URL [default: .strata/dvc-remote]")] = None,
) -> None:
    """Make DIR a workspace: git, DVC with a default remote, strata.toml, the ledger at head. Idempotent."""
    from strata.tasks.workspace.setup import init_workspace

    changes = init_workspace(directory, remote)
    for change in changes:
        console.print(f"[green]✓[/] {change}")
    if not changes:
        console.print(f"{directory.resolve()} is already a Strata workspace; nothing changed.")


@app.command()
def ingest(
    source: Annotated[
        Path, typer.Argument(help="ImageFolder tree (class/*.jpg or train/ + test/) or .zip/.tar(.gz/.bz2/.xz)")
    ],
    learner: Annotated[str, typer.Option(help="the learner this batch of new classes is for")],
    test_fraction: Annotated[float, typer.Option(min=0.01, max=0.99, help="test share when SRC has no split")] = 0.25,
    seed: Annotated[int, typer.Option(help="seed of that train/test split")] = 0,
    workspace: WorkspaceOption = None,
) -> None:
    """Validate a batch and record it as a DVC-versioned data version of LEARNER."""
    from strata.tasks.data.ingest import ingest as ingest_batch

    result = ingest_batch(workspace_settings(workspace), source, learner, test_fraction, seed)
    verb = "ingested" if result.created else "already ingested (nothing changed):"
    console.print(
        f"{verb} {result.batch_id} for {result.learner}: {_class_counts(result.classes)} "
        f"md5 {result.md5} git {result.git_rev[:10]}",
        highlight=False,
    )


@data_app.command("list")
def data_list(
    learner: Annotated[str | None, typer.Option(help="only this learner's versions")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """The ingested data versions with their classes and counts."""
    table = Table(title="data versions")
    for column in ("batch", "learner", "classes (train/test)", "git", "created"):
        table.add_column(column, no_wrap=column != "classes (train/test)")
    for v in data_versions(learner, workspace):
        table.add_row(v["batch_id"], v["learner"], _class_counts(v["classes"]), v["git_rev"][:10], v["created"])
    console.print(table)


@data_app.command("show")
def data_show(
    batch: Annotated[str, typer.Argument(help="batch id (see `strata data list`)")], workspace: WorkspaceOption = None
) -> None:
    """One data version in full, as JSON."""
    from strata.tasks.data.ingest import IngestError

    matches = [v for v in data_versions(None, workspace) if v["batch_id"] == batch]
    if not matches:
        raise IngestError(f"no data version {batch!r}; see `strata data list`")
    console.print_json(json.dumps(matches[0]))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head", workspace: WorkspaceOption = None) -> None:
    """Migrate the ledger up to REVISION."""
    from strata.tasks.ledger import migrate

    url = workspace_settings(workspace).ledger_url
    migrate.upgrade(url, revision)
    console.print(f"ledger at revision {migrate.current_revision(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()] = "-1", workspace: WorkspaceOption = None) -> None:
    """Migrate the ledger down to REVISION (default: one step; `base` drops every table)."""
    from strata.tasks.ledger import migrate

    url = workspace_settings(workspace).ledger_url
    migrate.downgrade(url, revision)
    console.print(f"ledger at revision {migrate.current_revision(url)}")


@db_app.command("current")
def db_current(workspace: WorkspaceOption = None) -> None:
    """The ledger's revision and the head revision."""
    from strata.tasks.ledger import migrate

    revision, head = migrate.current_revision(workspace_settings(workspace).ledger_url), migrate.head_revision()
    hint = "" if revision == head else " — run `strata db upgrade`"
    console.print(f"ledger at revision {revision} (head {head}){hint}")


def data_versions(learner: str | None = None, workspace: Path | None = None) -> list[dict]:
    """The ledger's data versions as plain rows (oldest first)."""
    from strata.tasks.ledger import migrate
    from strata.tasks.ledger.store import list_data_versions

    settings = workspace_settings(workspace)
    with migrate.ledger(settings.ledger_url) as session:
        return [
            dict(
                batch_id=v.batch_id,
                learner=v.learner.name,
                classes=v.classes,
                split=v.split,
                md5=v.md5,
                hash_name=v.hash_name,
                git_rev=v.git_rev,
                remote=v.remote,
                path=v.path,
                created=v.created.isoformat(timespec="seconds"),
            )
            for v in list_data_versions(session, learner)
        ]
