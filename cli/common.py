"""What every command module shares: the Typer app and its groups, the console, options, formatting."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from strata.models.backbones import BackboneError
from strata.models.methods import StateError, UnknownMethodError
from strata.models.streams import StreamError
from strata.tasks.benchmarking.profiles import UnknownProfileError
from strata.tasks.data.ingest import IngestError
from strata.tasks.data.materialise import DataVersionError
from strata.tasks.data.readers import DatasetError
from strata.tasks.data.validate import BatchRejectedError
from strata.tasks.data.versioning import VersioningError
from strata.tasks.ledger.increments import LearnerConfigError
from strata.tasks.ledger.store import LeaseHeldError, LedgerError
from strata.tasks.orchestration.deployments import DeploymentError
from strata.tasks.serving.app import ServeError
from strata.tasks.serving.sources import ModelSourceError
from strata.tasks.workspace.settings import SettingsError
from strata.tasks.workspace.writes import WorkspaceWriteError


class DemoError(ValueError):
    """The demo cannot start as asked; the message says how to fix it."""


app = typer.Typer(
    help="Strata: class-incremental learning on frozen pretrained ViTs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Ingested data versions.", no_args_is_help=True)
db_app = typer.Typer(help="The ledger's schema (alembic migrations).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(db_app, name="db")
USER_ERRORS = (
    UnknownProfileError,
    BackboneError,
    DatasetError,
    StreamError,
    UnknownMethodError,
    StateError,
    SettingsError,
    ValidationError,
    BatchRejectedError,
    IngestError,
    LedgerError,
    DataVersionError,
    VersioningError,
    ServeError,
    ModelSourceError,
    LearnerConfigError,
    LeaseHeldError,
    DemoError,
    DeploymentError,
    WorkspaceWriteError,
)

console = Console()


WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="workspace root [default: the one containing the current directory]"),
]


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


def _increments_table(item: dict) -> Table:
    table = Table(title=f"{item['learner']} ({item['method']} on {item['backbone']}) · champion v{item['champion']}")
    for column in ("task", "status", "version", "A_t", "Ā", "promoted"):
        table.add_column(column, justify="right")
    for inc in item["increments"]:
        table.add_row(
            str(inc["task"]),
            inc["status"],
            str(inc["version"] or "–"),
            _pct(inc["accuracy"]) if inc["accuracy"] is not None else "–",
            _pct(inc["average_incremental_accuracy"]) if inc["average_incremental_accuracy"] is not None else "–",
            {True: "yes", False: "no"}.get(inc["promoted"], "–"),
        )
    return table


def _class_counts(classes: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{name} {c['train']}/{c['test']}" for name, c in classes.items())


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


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"{option} takes comma-separated integers, not {text!r}") from exc


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"
