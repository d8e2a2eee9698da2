"""The model registry's aliases and the promotion gate.

Every increment registers a version of ``strata-<learner>``; ``candidate`` always moves to it,
``champion`` only when the gate passes: accuracy on the champion's classes may drop by at most a
budget relative to the champion's own accuracy on them, and A_t must reach a floor. The decision and
its reasons are logged with the run and recorded in the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field

CHAMPION = "champion"
CANDIDATE = "candidate"


class GateConfig(BaseModel):
    """Promotion rules; both bounds are fractions (0.05 = five accuracy points)."""

    model_config = ConfigDict(extra="forbid")

    old_accuracy_budget: float = Field(0.05, ge=0, le=1, description="allowed drop on the champion's classes")
    accuracy_floor: float = Field(0.0, ge=0, le=1, description="minimum A_t of a champion")


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    champion_version: str | None


def weighted(accuracies: list[float], sizes: list[int]) -> float:
    return float(np.dot(accuracies, sizes) / max(sum(sizes), 1))


def decide(
    config: GateConfig,
    row: list[float],
    sizes: list[int],
    accuracy: float,
    champion_version: str | None,
    champion_task: int | None,
    champion_accuracy: float | None,
) -> GateDecision:
    """Compare a candidate (its R row and A_t) with the current champion (its task and A_t)."""
    reasons, promote = [], True
    if accuracy < config.accuracy_floor:
        promote = False
        reasons.append(f"A_t {accuracy:.4f} is below the floor {config.accuracy_floor:.4f}")
    else:
        reasons.append(f"A_t {accuracy:.4f} reaches the floor {config.accuracy_floor:.4f}")
    if champion_version is None or champion_task is None or champion_accuracy is None:
        reasons.append("no champion yet")
    else:
        on_champion_classes = weighted(row[: champion_task + 1], sizes[: champion_task + 1])
        drop = champion_accuracy - on_champion_classes
        verdict = "within" if drop <= config.old_accuracy_budget + 1e-12 else "beyond"
        promote = promote and verdict == "within"
        reasons.append(
            f"accuracy on champion v{champion_version}'s classes {on_champion_classes:.4f} vs its "
            f"{champion_accuracy:.4f}: drop {drop:.4f} {verdict} the budget "
            f"{config.old_accuracy_budget:.4f}"
        )
    return GateDecision(promote, reasons, champion_version)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, version)


def version_tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    try:
        return dict(client.get_model_version(name, version).tags)
    except MlflowException as exc:
        raise ValueError(f"registered model {name} has no version {version}") from exc


def remove_unrecorded_versions(client: MlflowClient, name: str, task_index: int, keep: set[str]) -> list[str]:
    """Delete versions of ``task_index`` left by a crashed attempt (registered, never recorded in the
    ledger), so that one increment never owns two registered versions."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    stale = [
        str(v.version)
        for v in versions
        if v.tags.get("strata.task_index") == str(task_index) and str(v.version) not in keep
    ]
    for version in stale:
        client.delete_model_version(name, version)
    return stale
