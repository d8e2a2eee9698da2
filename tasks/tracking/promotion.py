"""The model registry's aliases and the promotion gate.

Every increment registers a version of ``strata-<learner>``; ``candidate`` always moves to it,
``champion`` only when the gate passes: accuracy on the champion's classes may drop by at most a
budget relative to the champion's own accuracy on them, and A_t must reach a floor. The decision and
its reasons are logged with the run and recorded in the ledger.
"""

from __future__ import annotations

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field

from strata.tasks.ledger.increments import LearnedTask
from strata.tasks.tracking.figures import IncrementMetrics

CHAMPION = "champion"
CANDIDATE = "candidate"


class GateConfig(BaseModel):
    """Promotion rules; both bounds are fractions (0.05 = five accuracy points)."""

    model_config = ConfigDict(extra="forbid")

    old_accuracy_budget: float = Field(0.05, ge=0, le=1, description="allowed drop on the champion's classes")
    accuracy_floor: float = Field(0.0, ge=0, le=1, description="minimum A_t of a champion")


class CandidateFigures(BaseModel):
    """A candidate as the gate sees it: its R row, the test-set sizes of the tasks it covers, its A_t."""

    model_config = ConfigDict(frozen=True)

    row: list[float]
    test_sizes: list[int]
    accuracy: float


class ChampionFigures(BaseModel):
    """The current champion: the ``champion`` alias's version (None: no alias yet) and, when the ledger
    recorded that version, the task it was registered at and its A_t then (else the gate has nothing
    to compare with and does not promote over it: the ledger was lost or replaced, see ``strata doctor``)."""

    model_config = ConfigDict(frozen=True)

    version: str | None = None
    task_index: int | None = None
    accuracy: float | None = None


class GateDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    promote: bool
    reasons: list[str]
    champion_version: str | None


def weighted(accuracies: list[float], sizes: list[int]) -> float:
    return float(np.dot(accuracies, sizes) / max(sum(sizes), 1))


def decide(config: GateConfig, candidate: CandidateFigures, champion: ChampionFigures) -> GateDecision:
    """Compare a candidate (its R row and A_t) with the current champion (its task and A_t)."""
    reasons, promote = [], True
    accuracy = candidate.accuracy
    if accuracy < config.accuracy_floor:
        promote = False
        reasons.append(f"A_t {accuracy:.4f} is below the floor {config.accuracy_floor:.4f}")
    else:
        reasons.append(f"A_t {accuracy:.4f} reaches the floor {config.accuracy_floor:.4f}")
    if champion.version is None:
        reasons.append("no champion yet")
    elif champion.task_index is None or champion.accuracy is None:
        promote = False  # a lost or replaced ledger: the gate must not move a champion it cannot compare with
        reasons.append(
            f"champion v{champion.version} is not recorded in the ledger, so the gate cannot compare with it and "
            "leaves it in place; see `strata doctor`"
        )
    else:
        covered = champion.task_index + 1
        on_champion_classes = weighted(candidate.row[:covered], candidate.test_sizes[:covered])
        drop = champion.accuracy - on_champion_classes
        verdict = "within" if drop <= config.old_accuracy_budget + 1e-12 else "beyond"
        promote = promote and verdict == "within"
        reasons.append(
            f"accuracy on champion v{champion.version}'s classes {on_champion_classes:.4f} vs its "
            f"{champion.accuracy:.4f}: drop {drop:.4f} {verdict} the budget "
            f"{config.old_accuracy_budget:.4f}"
        )
    return GateDecision(promote=promote, reasons=reasons, champion_version=champion.version)


def champion_figures(client: MlflowClient, name: str, history: list[LearnedTask]) -> ChampionFigures:
    """The champion of registered model ``name``, from its alias and the learner's succeeded increments."""
    version = alias_version(client, name, CHAMPION)
    for learned in history:
        if learned.model_version == version:
            recorded = IncrementMetrics.model_validate(learned.metrics)
            return ChampionFigures(version=version, task_index=learned.task_index, accuracy=recorded.accuracy)
    return ChampionFigures(version=version)


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


def remove_attempt_versions(client: MlflowClient, name: str, run_id: str, keep: set[str]) -> list[str]:
    """Delete the versions of ``name`` that run ``run_id`` registered, but none in ``keep`` (the ledger's): the
    run is a dead attempt's, recorded in the ledger before it registered, so these versions are provably its.
    A version no attempt recorded is never deleted here, whatever its tags say (``strata doctor`` reports it)."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    stale = [str(v.version) for v in versions if v.run_id == run_id and str(v.version) not in keep]
    for version in stale:
        client.delete_model_version(name, version)
    return stale
