"""A learner's increments read back from MLflow alone, without the ledger: what ``strata doctor --repair``
rebuilds a lost ledger from.

Each increment left a child run (tags ``strata.task_index``, ``strata.batch_id``, ``strata.dvc_md5``,
``strata.parent_version``, ``strata.gate``; artifacts ``metrics.json``, ``gate.json`` and ``state/``, whose
``state.json`` names the method, its config, the backbone and the classes in id order) and one registered version
of that run. The increments are the chain of versions from task 0, each the child of the one before
(``strata.parent_version``), so a version left by an interrupted attempt of another chain is not taken for one.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from strata.models.methods.base import STATE_META
from strata.tasks.tracking import runs
from strata.tasks.tracking.figures import IncrementMetrics, LearnerFigures
from strata.tasks.tracking.reports import METRICS_FILE

GATE_FILE = "gate.json"
STATE_ARTIFACT = "state"


@dataclass(frozen=True)
class TrackedIncrement:
    """One increment as MLflow holds it: its task, data version, run, registered version, metrics (as the ledger
    stores them), the state's meta (``state.json``) and whether the gate promoted it."""

    task_index: int
    batch_id: str
    md5: str
    run_id: str
    version: str
    metrics: dict[str, Any]
    state_meta: dict[str, Any]
    promoted: bool


def tracked_increments(client: MlflowClient, learner: str, tracking_uri: str) -> list[TrackedIncrement]:
    """The learner's increments in task order: the chain of registered versions from task 0 (see the module)."""
    try:
        versions = client.search_model_versions(f"name = '{runs.model_name(learner)}'")
    except MlflowException:
        return []
    by_task: dict[str, list[tuple[int, str, dict[str, str]]]] = {}
    for version in versions:
        if not version.run_id:
            continue  # registered from a path, not from a run: not an increment
        try:
            tags = client.get_run(version.run_id).data.tags
        except MlflowException:
            continue
        if tags.get("strata.learner") == learner:
            by_task.setdefault(tags.get("strata.task_index", ""), []).append(
                (int(version.version), version.run_id, tags)
            )
    chain: list[TrackedIncrement] = []
    parent = ""
    while True:
        task_index = len(chain)
        children = [c for c in by_task.get(str(task_index), []) if c[2].get("strata.parent_version", "") == parent]
        if not children:
            return chain
        number, run_id, tags = max(children)  # two: an attempt died after registering; the later one is the retry's
        chain.append(_increment(client, tracking_uri, task_index, str(number), run_id, tags))
        parent = str(number)


def _increment(
    client: MlflowClient, tracking_uri: str, task_index: int, version: str, run_id: str, tags: dict[str, str]
) -> TrackedIncrement:
    report = _artifact_json(run_id, METRICS_FILE, tracking_uri)  # the figures, and the method and learner besides
    figures = LearnerFigures.model_validate({key: report[key] for key in LearnerFigures.model_fields})
    gate = _artifact_json(run_id, GATE_FILE, tracking_uri)
    metrics = IncrementMetrics(
        row=[float(value) for value in figures.accuracy_matrix[task_index][: task_index + 1] if value is not None],
        test_sizes=figures.test_sizes,
        accuracy=figures.accuracy[task_index],
        average_incremental_accuracy=figures.average_incremental_accuracy,
        forgetting=figures.forgetting[task_index],
        train_losses=[m.value for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)],
        gate=list(gate.get("reasons", [])),
        promoted=bool(gate.get("promote", False)),
    )
    return TrackedIncrement(
        task_index=task_index,
        batch_id=tags.get("strata.batch_id", ""),
        md5=tags.get("strata.dvc_md5", ""),
        run_id=run_id,
        version=version,
        metrics=metrics.model_dump(),
        state_meta=_artifact_json(run_id, f"{STATE_ARTIFACT}/{STATE_META}", tracking_uri),
        promoted=metrics.promoted,
    )


def _artifact_json(run_id: str, path: str, tracking_uri: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="strata-artifact-") as scratch:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=scratch, tracking_uri=tracking_uri
        )
        return json.loads(Path(local).read_text())


def download_state(run_id: str, into: Path, tracking_uri: str) -> Path:
    """The run's ``state/`` artifacts (the checkpoint) downloaded into ``into``."""
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=STATE_ARTIFACT, dst_path=str(into), tracking_uri=tracking_uri
        )
    )
