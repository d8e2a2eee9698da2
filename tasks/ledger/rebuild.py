"""Ledger rows rebuilt from what other stores recorded (git and DVC, MLflow), written only where the ledger has none.

``strata doctor --repair`` reads the surviving stores and hands the rows here as plain values; this module
only fills in: a row the ledger already has (a data version by batch id, a learner by name, an increment by
learner and task, a class by name, any promotion record of the learner) is left exactly as it is, and each
row written is reported in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.tasks.ledger.increments import ChampionMove
from strata.tasks.ledger.store import (
    DataVersion,
    Increment,
    LearnedClass,
    Learner,
    Promotion,
    find_data_version,
    find_learner,
    get_or_create_learner,
    utcnow,
)

REBUILT_SPLIT = {"kind": "unknown", "note": "rebuilt by strata doctor --repair: how train/test were formed is lost"}


@dataclass(frozen=True)
class RebuiltVersion:
    """A data version as git and DVC hold it (see ``strata.tasks.data.history``)."""

    batch_id: str
    learner: str
    path: str
    classes: dict[str, dict[str, int]]
    md5: str
    hash_name: str
    git_rev: str
    remote: str


@dataclass(frozen=True)
class RebuiltIncrement:
    """A succeeded increment as MLflow holds it; ``class_names`` are all the learner's classes after it, in id order."""

    task_index: int
    batch_id: str
    checkpoint_uri: str
    metrics: dict[str, Any]
    run_id: str
    model_version: str
    class_names: list[str]


@dataclass(frozen=True)
class RebuiltLearner:
    """A learner, its spec as its last state recorded it (None: it never learned), its increments and champion moves."""

    name: str
    method: str | None
    backbone: str | None
    method_config: dict[str, Any]
    increments: list[RebuiltIncrement] = field(default_factory=list)
    promotions: list[ChampionMove] = field(default_factory=list)


def fill_data_versions(session: Session, versions: list[RebuiltVersion]) -> list[str]:
    """Add the data versions the ledger lacks, in the order given (ingestion order: their ids keep it)."""
    done = []
    for version in versions:
        if find_data_version(session, version.batch_id) is not None:
            continue
        session.add(
            DataVersion(
                batch_id=version.batch_id,
                learner=get_or_create_learner(session, version.learner),
                path=version.path,
                classes=version.classes,
                split=REBUILT_SPLIT,
                md5=version.md5,
                hash_name=version.hash_name,
                git_rev=version.git_rev,
                remote=version.remote,
            )
        )
        session.flush()
        done.append(
            f"ledger: added data version {version.batch_id} of learner {version.learner} (git {version.git_rev[:12]})"
        )
    return done


def fill_learner(session: Session, rebuilt: RebuiltLearner) -> list[str]:
    """Add the learner, its spec, increments, classes and promotions where the ledger has none of them."""
    done = []
    learner = find_learner(session, rebuilt.name)
    if learner is None:
        learner = Learner(name=rebuilt.name, method_config={})
        session.add(learner)
        session.flush()
        done.append(f"ledger: added learner {rebuilt.name}")
    if learner.method is None and rebuilt.method is not None:
        learner.method, learner.backbone, learner.method_config = (
            rebuilt.method,
            rebuilt.backbone,
            rebuilt.method_config,
        )
        done.append(
            f"ledger: learner {rebuilt.name} learns with {rebuilt.method} on {rebuilt.backbone}, "
            f"config overrides {rebuilt.method_config}"
        )
    done += _fill_increments(session, learner, rebuilt.increments)
    if rebuilt.promotions and session.scalar(select(Promotion.id).where(Promotion.learner_id == learner.id)) is None:
        for move in rebuilt.promotions:
            session.add(
                Promotion(
                    learner_id=learner.id,
                    model_version=move.version,
                    previous_version=move.previous,
                    actor=move.actor,
                    reason=move.reason[:1024],
                )
            )
            was = f"v{move.previous}" if move.previous else "none"
            done.append(f"ledger: {rebuilt.name} champion {was} → v{move.version} ({move.actor})")
    return done


def _fill_increments(session: Session, learner: Learner, increments: list[RebuiltIncrement]) -> list[str]:
    """Add the succeeded increments the ledger lacks, stopping at a task it holds as failed or running (what
    follows it cannot have succeeded) or whose data version it does not hold."""
    done = []
    rows = {row.task_index: row for row in session.scalars(select(Increment).where(Increment.learner_id == learner.id))}
    known = set(session.scalars(select(LearnedClass.name).where(LearnedClass.learner_id == learner.id)))
    previous: list[str] = []
    for increment in increments:
        row = rows.get(increment.task_index)
        if row is not None and row.status != "succeeded":
            done.append(
                f"ledger: {learner.name} task {increment.task_index} is {row.status} there; kept, no later task added"
            )
            return done
        data = find_data_version(session, increment.batch_id)
        if row is None and (data is None or data.learner_id != learner.id):
            done.append(
                f"ledger: {learner.name} task {increment.task_index}: no data version {increment.batch_id}; not added"
            )
            return done
        if row is None and data is not None:
            session.add(
                Increment(
                    learner_id=learner.id,
                    task_index=increment.task_index,
                    data_version_id=data.id,
                    status="succeeded",
                    checkpoint_uri=increment.checkpoint_uri,
                    metrics=increment.metrics,
                    mlflow_run_id=increment.run_id,
                    model_version=increment.model_version,
                    started=utcnow(),
                    finished=utcnow(),
                )
            )
            done.append(
                f"ledger: added {learner.name} task {increment.task_index} ({increment.batch_id}): "
                f"v{increment.model_version}, run {increment.run_id}, checkpoint {increment.checkpoint_uri}"
            )
        added = []
        for class_id, name in enumerate(increment.class_names[len(previous) :], start=len(previous)):
            if name not in known:
                session.add(
                    LearnedClass(learner_id=learner.id, class_id=class_id, name=name, first_task=increment.task_index)
                )
                known.add(name)
                added.append(f"{class_id}={name}")
        if added:
            done.append(f"ledger: {learner.name} classes {', '.join(added)} (task {increment.task_index})")
        previous = increment.class_names
        session.flush()
    return done
