"""Prefect artifacts for people watching a learner in the Prefect UI.

A progress artifact while a task trains, a table of per-task accuracy, and a markdown summary with
the accuracy curve and matrix (embedded PNGs) and links to the MLflow run and model version.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import cast
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from strata.models.engine import EpochReport


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


class TrainingProgress:
    """Updates one progress artifact per increment from the engine's epoch reports."""

    def __init__(self, learner: str, task_index: int):
        # Prefect's async_dispatch types the result as "UUID or coroutine"; training runs in synchronous
        # tasks, where it calls the synchronous implementation, which returns the UUID.
        self.artifact_id = cast(
            UUID,
            create_progress_artifact(
                0.0, key=artifact_key("training", learner), description=f"{learner}: training task {task_index}"
            ),
        )

    def __call__(self, report: EpochReport) -> None:
        update_progress_artifact(
            self.artifact_id,
            100.0 * (report.epoch + 1) / report.epochs,
            description=f"task {report.task} epoch {report.epoch + 1}/{report.epochs}, loss {report.loss:.4f}",
        )


def accuracy_table(learner: str, summary: dict) -> None:
    rows = [
        {
            "task": t,
            "A_t": round(100 * a, 2),
            "task-averaged": round(100 * ta, 2),
            "forgetting": round(100 * f, 2),
            "new": round(100 * n, 2),
        }
        for t, (a, ta, f, n) in enumerate(
            zip(
                summary["accuracy"],
                summary["task_averaged_accuracy"],
                summary["forgetting"],
                summary["new_accuracy"],
                strict=True,
            )
        )
    ]
    create_table_artifact(rows, key=artifact_key("accuracy", learner), description=f"{learner}: accuracy per task")


def _png(path: Path) -> str:
    return f"![{path.stem}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def increment_summary(
    learner: str,
    task_index: int,
    summary: dict,
    gate: list[str],
    promoted: bool,
    version: str,
    run_link: str,
    plots: list[Path],
) -> None:
    lines = [
        f"# {learner}: task {task_index}",
        "",
        f"- A_t **{100 * summary['accuracy'][task_index]:.2f}**, "
        f"Ā {100 * summary['average_incremental_accuracy']:.2f}, "
        f"forgetting {100 * summary['forgetting'][task_index]:.2f}",
        f"- registered version **{version}** — {'promoted to champion' if promoted else 'not promoted'}",
        *[f"  - {reason}" for reason in gate],
        f"- MLflow run: {run_link}",
        "",
        *[_png(p) for p in plots],
    ]
    create_markdown_artifact(
        "\n".join(lines), key=artifact_key("summary", learner), description=f"{learner}: increment {task_index}"
    )
