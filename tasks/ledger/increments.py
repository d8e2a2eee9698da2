"""The ledger side of learning: which data a learner still has to learn, and each increment's life.

An increment row is written ``running`` before training starts, ``failed`` (with the error) when a
step raises, and ``succeeded`` only in the same transaction that records its classes, checkpoint,
metrics, MLflow run and model version: the last good state is always the last succeeded increment,
and a failed one is retried by the next ``learn`` without manual clean-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from strata.models.errors import UserError
from strata.tasks.ledger.store import (
    DataVersion,
    Increment,
    LearnedClass,
    Learner,
    LedgerError,
    Promotion,
    find_learner,
    ledger_session,
    utcnow,
)


class LearnerConfigError(UserError, ValueError):
    """A learner is asked to change its method or backbone after it has learned."""


@dataclass(frozen=True)
class LearnedTask:
    """A succeeded increment, as the next increment needs it."""

    task_index: int
    batch_id: str
    checkpoint_uri: str
    metrics: dict[str, Any]
    model_version: str | None
    run_id: str | None


def configure_learner(
    session: Session, name: str, method: str | None, backbone: str | None, config: dict[str, Any]
) -> Learner:
    """Fix the learner's method, backbone and config on first learn; refuse a later change."""
    learner = find_learner(session, name)
    if learner is None:
        learner = Learner(name=name, method_config={})
        session.add(learner)
        session.flush()
    has_learned = session.scalar(
        select(Increment.id).where(Increment.learner_id == learner.id, Increment.status == "succeeded").limit(1)
    )
    if learner.method is None or not has_learned:
        learner.method = method or learner.method or "simplecil"
        learner.backbone = backbone or learner.backbone or "tiny"
        learner.method_config = config or learner.method_config or {}
        return learner
    for field, asked in (("method", method), ("backbone", backbone)):
        if asked is not None and asked != getattr(learner, field):
            raise LearnerConfigError(
                f"learner {name!r} learns with {field} {getattr(learner, field)!r}; it cannot "
                f"switch to {asked!r} after learning. Create a new learner for {asked!r}."
            )
    if config and config != learner.method_config:
        raise LearnerConfigError(
            f"learner {name!r} has method config {learner.method_config}; it cannot change to {config} after learning"
        )
    return learner


def learned_tasks(session: Session, learner: Learner) -> list[LearnedTask]:
    rows = session.execute(
        select(Increment, DataVersion.batch_id)
        .join(DataVersion)
        .where(Increment.learner_id == learner.id, Increment.status == "succeeded")
        .order_by(Increment.task_index)
    ).all()
    return [
        LearnedTask(i.task_index, batch, i.checkpoint_uri or "", i.metrics, i.model_version, i.mlflow_run_id)
        for i, batch in rows
    ]


def pending_versions(session: Session, learner: Learner) -> list[DataVersion]:
    """Data versions ingested for the learner and not learned yet, oldest first."""
    done = select(Increment.data_version_id).where(Increment.learner_id == learner.id, Increment.status == "succeeded")
    return list(
        session.scalars(
            select(DataVersion)
            .where(DataVersion.learner_id == learner.id, DataVersion.id.not_in(done))
            .order_by(DataVersion.id)
        )
    )


def start_increment(engine: Engine, learner_id: int, task_index: int, data_version_id: int) -> int:
    """Mark the increment running (re-using a failed or abandoned row of the same task); returns its id."""
    with ledger_session(engine) as session:
        row = session.scalar(
            select(Increment).where(Increment.learner_id == learner_id, Increment.task_index == task_index)
        )
        if row is None:
            row = Increment(learner_id=learner_id, task_index=task_index, metrics={})
            session.add(row)
        elif row.status == "succeeded":
            raise LedgerError(f"task {task_index} of learner {learner_id} already succeeded")
        row.data_version_id, row.status, row.started, row.finished = data_version_id, "running", utcnow(), None
        row.metrics = {}
        session.flush()
        return row.id


def fail_interrupted_increments(session: Session, learner: Learner) -> list[int]:
    """Mark the learner's ``running`` increments failed; returns their task indexes.

    Called under the learner's lease, where no other run can be working: a row still ``running`` was
    left by a run that died without its ``except`` (``kill -9``, power loss, OOM killer).
    """
    rows = list(
        session.scalars(select(Increment).where(Increment.learner_id == learner.id, Increment.status == "running"))
    )
    for row in rows:
        row.status, row.finished = "failed", utcnow()
        row.metrics = {"error": "interrupted: the run learning it ended without finishing (killed or crashed)"}
    return [row.task_index for row in rows]


def attempt_run(engine: Engine, increment_id: int) -> str | None:
    """The MLflow run the increment's latest attempt recorded before it wrote anything (None: no attempt did)."""
    with ledger_session(engine) as session:
        return session.get_one(Increment, increment_id).attempt_run_id


def record_attempt(engine: Engine, increment_id: int, run_id: str) -> None:
    """Record ``run_id`` as the run of the increment's attempt, committed before the attempt registers a version:
    whatever that run made is then provably this attempt's, and only that is removed if the attempt dies."""
    with ledger_session(engine) as session:
        session.get_one(Increment, increment_id).attempt_run_id = run_id


def fail_increment(engine: Engine, increment_id: int, error: str) -> None:
    with ledger_session(engine) as session:
        row = session.get_one(Increment, increment_id)
        row.status, row.finished, row.metrics = "failed", utcnow(), {"error": error[:2000]}


class SucceededIncrement(BaseModel):
    """What a succeeded increment leaves in the ledger besides its status: the classes it added (ids from
    ``first_class_id`` on), its checkpoint, its metrics (JSON, as ``strata.tasks.tracking.figures.IncrementMetrics``
    dumps them), its MLflow run and registered model version."""

    model_config = ConfigDict(frozen=True)

    class_names: list[str]
    first_class_id: int
    checkpoint_uri: str
    metrics: dict[str, Any]
    run_id: str
    model_version: str


def finish_increment(engine: Engine, increment_id: int, done: SucceededIncrement) -> None:
    """Record the increment and its classes in one transaction: it becomes the learner's last good state."""
    with ledger_session(engine) as session:
        row = session.get_one(Increment, increment_id)
        for offset, name in enumerate(done.class_names):
            session.add(
                LearnedClass(
                    learner_id=row.learner_id,
                    class_id=done.first_class_id + offset,
                    name=name,
                    first_task=row.task_index,
                )
            )
        row.status, row.finished, row.checkpoint_uri = "succeeded", utcnow(), done.checkpoint_uri
        row.metrics, row.mlflow_run_id, row.model_version = done.metrics, done.run_id, done.model_version


class ChampionMove(BaseModel):
    """One move of a learner's ``champion`` alias: to ``version`` from ``previous``, by whom and why."""

    model_config = ConfigDict(frozen=True)

    version: str
    previous: str | None
    actor: str
    reason: str


def record_promotion(engine: Engine, learner_id: int, move: ChampionMove) -> None:
    with ledger_session(engine) as session:
        session.add(
            Promotion(
                learner_id=learner_id,
                model_version=move.version,
                previous_version=move.previous,
                actor=move.actor,
                reason=move.reason[:1024],
            )
        )


def promotions(session: Session, learner: Learner) -> list[Promotion]:
    return list(session.scalars(select(Promotion).where(Promotion.learner_id == learner.id).order_by(Promotion.id)))


def increments(session: Session, learner: Learner) -> list[Increment]:
    return list(
        session.scalars(select(Increment).where(Increment.learner_id == learner.id).order_by(Increment.task_index))
    )


def learners(session: Session, name: str | None = None) -> list[Learner]:
    query = select(Learner).order_by(Learner.name)
    return list(session.scalars(query if name is None else query.where(Learner.name == name)))
