"""``strata demo``: the whole platform on scikit-learn's digits, offline, in a few minutes.

A fresh workspace; the digits split into 5 batches of 2 classes as a data team would deliver them;
each batch ingested (validated, versioned with DVC, recorded) and learned by the ``learn`` flow
(tracked in MLflow, registered, gated). The backbone is the random-init ``tiny`` ViT, and the output
says so: the run shows the platform working, not what a pretrained ViT would reach.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from strata.cli.common import _increments_table, app, console
from strata.flows.learn import LearnParams, learn
from strata.models.errors import UserError
from strata.models.methods import method_entry
from strata.tasks.data.demo_batches import write_digit_batches
from strata.tasks.data.ingest import ingest
from strata.tasks.tracking.champion import status
from strata.tasks.workspace.settings import load_settings, redact_url
from strata.tasks.workspace.setup import init_workspace

LEARNER = "digits"


class DemoError(UserError, ValueError):
    """The demo cannot start as asked; the message says how to fix it."""


def fresh_folder(directory: Path | None) -> Path:
    """``directory``, refused unless empty or missing (default: a new temporary folder)."""
    directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="strata-demo-")) / "workspace"
    if directory.exists() and any(directory.iterdir()):
        raise DemoError(f"{directory} is not empty; the demo needs a fresh workspace: pass another --dir")
    return directory


def run_demo(
    directory: Path | None = None, method: str = "simplecil", on_batch: Callable[[int, int, str], None] | None = None
) -> dict[str, Any]:
    """Ingest and learn 5 digit batches in a fresh workspace; returns the learner's status and timings."""
    directory = fresh_folder(directory)
    started = time.perf_counter()
    init_workspace(directory)
    settings = load_settings(directory)
    with tempfile.TemporaryDirectory(prefix="strata-demo-incoming-") as incoming:
        batches = write_digit_batches(Path(incoming))
        for index, batch in enumerate(batches):
            if on_batch is not None:
                on_batch(index, len(batches), batch.name)
            ingest(settings, batch, LEARNER)
            learn(
                LearnParams(
                    learner=LEARNER, method=method, backbone="tiny", workspace=str(directory), show_progress=False
                )
            )
    (summary,) = status(LEARNER, directory)
    return {
        "workspace": str(directory),
        "settings": settings,
        "status": summary,
        "seconds": time.perf_counter() - started,
    }


@app.command()
def demo(
    method: Annotated[str, typer.Option(help="method the digits learner uses")] = "simplecil",
    directory: Annotated[
        Path | None, typer.Option("--dir", help="fresh workspace folder [default: a new temporary folder]")
    ] = None,
) -> None:
    """Ingest and learn scikit-learn's digits in 5 batches, end to end, offline."""
    from rich.progress import Progress

    directory = fresh_folder(directory)  # refused before anything is printed
    method_entry(method)
    console.print(
        "[yellow]note:[/] the demo uses the [bold]tiny RANDOMLY INITIALISED[/] ViT: it shows the platform "
        "working, not what a pretrained backbone reaches (pass real weights to `strata learn` for that)."
    )
    with Progress(console=console) as progress:
        bar = progress.add_task("ingest + learn", total=5)

        def advance(index: int, total: int, name: str) -> None:
            progress.update(bar, completed=index, total=total, description=f"ingest + learn {name}")

        result = run_demo(directory, method, advance)
        progress.update(bar, completed=5)
    item, settings = result["status"], result["settings"]
    console.print(_increments_table(item))
    console.print(f"champion: v{item['champion']} · workspace {result['workspace']} · {result['seconds']:.0f} s")
    console.print(
        f"MLflow UI:  mlflow ui --backend-store-uri {redact_url(settings.mlflow_tracking_uri)} "
        f"--default-artifact-root {settings.mlflow_artifacts} --host 127.0.0.1"
    )
    console.print("Prefect UI: prefect server start --host 127.0.0.1   (then open http://127.0.0.1:4200)")
