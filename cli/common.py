"""What every command module shares: the Typer app and its groups, the console, options, formatting.

The app's root command is also the CLI's one error boundary (``StrataGroup``): a ``StrataError``, or a
pydantic ValidationError of a command's parameters, ends the command as one ``error:`` line and the
error's exit code (``strata.models.errors``); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from strata.models.errors import StrataError, UserError
from strata.tasks.workspace.setup import WORKSPACE_MARKERS, find_workspace, workspace_settings

console = Console()


class NotAWorkspaceError(UserError):
    """The command needs a workspace and none is where it looked; the message says how to make or name one."""


class StrataGroup(TyperGroup):
    """The root command, and the one place a failing command becomes its message and exit code.

    Wrapping ``invoke`` covers every way in: the ``strata`` script, ``python -m strata.cli.app`` and
    ``typer.testing.CliRunner``, each of which runs the command through this group.
    """

    def invoke(self, ctx: Any) -> Any:  # typer bundles its own click; its Context class is private
        try:
            return super().invoke(ctx)
        except StrataError as exc:
            _fail(str(exc) or type(exc).__name__, exc.exit_code)
        except ValidationError as exc:
            _fail(_invalid_parameters(exc), UserError.exit_code)


def _fail(message: str, exit_code: int) -> NoReturn:
    """Print ``error: <message>`` on one line (never wrapped, never read as markup) and exit."""
    console.print(Text.assemble(("error:", "bold red"), " ", " ".join(message.split())), soft_wrap=True)
    raise typer.Exit(exit_code)


def _invalid_parameters(exc: ValidationError) -> str:
    """Pydantic's multi-line report as one line: each field, what is wrong, and the value it was given."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "value"
        given = error.get("input")
        shown = f" (got {given!r})" if isinstance(given, str | int | float) and not isinstance(given, bool) else ""
        problems.append(f"{field}: {error['msg']}{shown}")
    return f"invalid {exc.title} parameters: {'; '.join(problems)}"


app = typer.Typer(
    cls=StrataGroup,
    help="Strata: class-incremental learning on frozen pretrained ViTs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Ingested data versions.", no_args_is_help=True)
db_app = typer.Typer(help="The ledger's schema (alembic migrations).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(db_app, name="db")


def require_workspace(given: Path | None) -> Path | None:
    """``given`` (or, when None, the workspace around the current directory), checked to be a workspace
    before the command reads or writes anything: otherwise it would make an empty ledger right there."""
    root = given.resolve() if given is not None else find_workspace()
    if not any((root / marker).exists() for marker in WORKSPACE_MARKERS):
        names = " or ".join(WORKSPACE_MARKERS)
        if given is not None:
            raise NotAWorkspaceError(
                f"{root} is not a Strata workspace (no {names} in it): pass the workspace's root, or make "
                f"this folder one with `strata init {root}`"
            )
        raise NotAWorkspaceError(
            f"{root} is not inside a Strata workspace (no {names} here or above): run the command in one, "
            "pass --workspace DIR, or make one with `strata init DIR`"
        )
    return given


# commands that must run whatever state the stores are in: they inspect, migrate or repair them
UNCHECKED_COMMANDS = {"db", "doctor"}


def _workspace_callback(ctx: typer.Context, given: Path | None) -> Path | None:
    if ctx.resilient_parsing:
        return given
    checked = require_workspace(given)
    _check_stores(ctx, checked)
    return checked


def _check_stores(ctx: typer.Context, workspace: Path | None) -> None:
    """The workspace's stores, checked to be present, intact and its own before the command touches any (and a
    move or copy of the workspace recorded): ``strata.tasks.workspace.identity``. ``db upgrade`` only refuses to
    start an empty ledger where a lost one left MLflow runs behind."""
    from strata.tasks.workspace import identity

    names = {ctx.info_name, ctx.parent.info_name if ctx.parent else None}
    if names & UNCHECKED_COMMANDS:
        if names >= {"db", "upgrade"}:
            identity.refuse_a_lost_ledger(workspace_settings(workspace))
        return
    identity.open_workspace(workspace_settings(workspace))


WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        callback=_workspace_callback,
        help="workspace root [default: the one containing the current directory]",
    ),
]


def _registered_version(learner: str, version: str | None, alias: str, workspace: Path | None) -> str:
    """The registered version a command names (``version``, else ``alias``'s), checked before any flow runs:
    a typo is then one line, not a failed flow run."""
    from strata.tasks.export.registered import resolve_version
    from strata.tasks.tracking import runs

    return resolve_version(runs.configure(workspace_settings(workspace)), learner, version, alias)


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


def _size_option(text: str, option: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` in pixels, e.g. ``256x256``."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        height = width = 0
    if min(height, width) <= 0:
        raise typer.BadParameter(f"{option} takes HEIGHTxWIDTH in pixels, e.g. 256x256, not {text!r}")
    return height, width


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"{option} takes comma-separated integers, not {text!r}") from exc


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"
