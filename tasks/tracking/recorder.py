"""The one recorder of what an increment writes to the ledger, MLflow and the model registry, in the order crash
recovery relies on:

    ledger: increment ``running`` → (the caller learns the task) → MLflow child run (params, tags, metrics at
    step t, data input, report, state, gate.json) → registered version → parent run's metrics → ledger:
    ``succeeded`` → alias ``candidate``, and ``champion`` with its promotion record when the gate passed.

Whatever raises before the ledger's commit marks the increment ``failed`` and leaves the learner's last good
state and ``champion`` as they were; a version that an attempt registered but the ledger never recorded is
deleted by the next attempt before it registers its own, so that an increment owns one version. Only what is
provably that attempt's is deleted: each attempt commits its child run's id to the ledger
(``increments.attempt_run_id``) before it registers anything, and the next attempt deletes the versions of that
run alone; a version no attempt recorded (a lost ledger's, another workspace's) is never touched. The learn flow
and the concurrent-writers benchmark record through here alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import mlflow
from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict

from strata.tasks.ledger.increments import (
    ChampionMove,
    LearnedTask,
    SucceededIncrement,
    attempt_run,
    fail_increment,
    finish_increment,
    record_attempt,
    record_promotion,
    start_increment,
)
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.tracking import promotion, runs
from strata.tasks.tracking.figures import IncrementMetrics, LearnerFigures
from strata.tasks.workspace.settings import StrataSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RecorderScope(BaseModel):
    """Whose increments a recorder writes, and under which runs: the learner, the parent MLflow run of this
    ``learn`` and its Prefect flow run (empty outside Prefect)."""

    model_config = ConfigDict(frozen=True)

    learner: str
    learner_id: int
    parent_run_id: str
    flow_run_id: str


class IncrementRecord(BaseModel):
    """What a learned increment hands the recorder: the data version it learned, the classes it added, the
    learner's succeeded increments before it, its run params, R row and figures, training losses, the gate's
    decision, the report files and the model to register."""

    model_config = ConfigDict(frozen=True)

    task_index: int
    data: runs.DataInput
    new_classes: list[str]
    first_class_id: int
    history: list[LearnedTask]
    params: runs.MethodParams
    row: list[float]
    figures: LearnerFigures
    losses: list[float]
    decision: promotion.GateDecision
    report: list[Path]
    model: runs.ModelPackage

    def metrics(self) -> IncrementMetrics:
        figures = self.figures.at(self.task_index)
        return IncrementMetrics(
            row=self.row,
            test_sizes=self.figures.test_sizes,
            accuracy=figures.accuracy,
            average_incremental_accuracy=figures.average_incremental_accuracy,
            forgetting=figures.forgetting,
            train_losses=self.losses,
            gate=self.decision.reasons,
            promoted=self.decision.promote,
        )

    def recorded_versions(self) -> set[str]:
        """The registered versions the ledger knows of: never deleted, even if a dead attempt's run made one."""
        return {t.model_version for t in self.history if t.model_version}


class RecordedIncrement(BaseModel):
    """An increment once tracked and registered: its record, child run and registered version."""

    model_config = ConfigDict(frozen=True)

    record: IncrementRecord
    run_id: str
    version: str

    def learned_task(self) -> LearnedTask:
        """The increment as the ledger now holds it, for the increments after it."""
        record = self.record
        return LearnedTask(
            task_index=record.task_index,
            batch_id=record.data.name,
            checkpoint_uri=str(record.model.state_dir),
            metrics=record.metrics().model_dump(),
            model_version=self.version,
            run_id=self.run_id,
        )


@dataclass(frozen=True)
class Step:
    """A write step that may run again after a failure, and how many times: tracking (its stale version is
    removed on the next attempt) and moving the aliases (idempotent)."""

    name: str
    retries: int


TRACK = Step("track-and-register", 1)
MOVE_ALIASES = Step("move-aliases", 2)


class StepRunner(Protocol):
    """Runs one of the recorder's retriable steps: directly, or as a Prefect task (retried, shown in the flow)."""

    def __call__(self, step: Step, write: Callable[..., T], /, *args: Any) -> T: ...


def run_directly(step: Step, write: Callable[..., T], /, *args: Any) -> T:
    return write(*args)


Registrar = Callable[[str, runs.ModelPackage, dict[str, str]], str]


class IncrementRecorder:
    """Writes a learner's increments (see the module's docstring); ``register`` makes the registered version
    in the active child run (the flow's: ``runs.log_and_register``), ``run_step`` runs the retriable steps."""

    def __init__(
        self, settings: StrataSettings, scope: RecorderScope, register: Registrar, run_step: StepRunner = run_directly
    ) -> None:
        self.settings = settings
        self.scope = scope
        self.register = register
        self.run_step = run_step

    def record(self, task_index: int, data_version_id: int, learn: Callable[[], IncrementRecord]) -> RecordedIncrement:
        """Mark the increment running, ``learn()`` it, track and register it, commit it, move the aliases."""
        db = migrated_engine(self.settings.ledger_url)
        increment_id = start_increment(db, self.scope.learner_id, task_index, data_version_id)
        try:
            record = learn()
            recorded = self.run_step(TRACK, self.track, record, increment_id)
            done = SucceededIncrement(
                class_names=record.new_classes,
                first_class_id=record.first_class_id,
                checkpoint_uri=self.settings.relative(record.model.state_dir),  # resolved at use: relocatable
                metrics=record.metrics().model_dump(),
                run_id=recorded.run_id,
                model_version=recorded.version,
            )
            finish_increment(db, increment_id, done)
        except BaseException as exc:
            fail_increment(db, increment_id, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            db.dispose()
        self.run_step(MOVE_ALIASES, self.move_aliases, recorded.version, record.decision)
        return recorded

    def track(self, record: IncrementRecord, increment_id: int) -> RecordedIncrement:
        """The child run, recorded in the ledger as this attempt's (after removing what the previous attempt's run
        registered), then one registered version of it, then the parent run's curve."""
        client = runs.configure(self.settings)
        figures = record.figures.at(record.task_index)
        log = runs.IncrementLog(
            params=record.params,
            tags=self._run_tags(record),
            figures=figures,
            losses=record.losses,
            data=record.data,
            files=record.report,
            state_dir=record.model.state_dir,
        )
        # explicit parent and experiment: Prefect may run this step on another thread than the flow's, and
        # MLflow's active-run stack is per thread
        parent = client.get_run(self.scope.parent_run_id)
        with mlflow.start_run(
            experiment_id=parent.info.experiment_id,
            parent_run_id=self.scope.parent_run_id,
            nested=True,
            run_name=f"task {record.task_index} ({record.data.name})",
        ) as child:
            self._take_over_attempt(client, increment_id, child.info.run_id, record)
            runs.log_increment(log)
            mlflow.log_dict(record.decision.model_dump(include={"promote", "reasons"}), "gate.json")
            version = self.register(self.scope.learner, record.model, self._version_tags(record))
        runs.log_parent_metrics(client, self.scope.parent_run_id, figures)
        return RecordedIncrement(record=record, run_id=child.info.run_id, version=version)

    def _take_over_attempt(self, client: MlflowClient, increment_id: int, run_id: str, record: IncrementRecord) -> None:
        """Delete the versions the previous attempt's recorded run registered, then record ``run_id`` as this
        attempt's, in that order: a death between the two leaves the previous run recorded, still to clean."""
        name = runs.model_name(self.scope.learner)
        db = migrated_engine(self.settings.ledger_url)
        try:
            previous = attempt_run(db, increment_id)
            stale = (
                promotion.remove_attempt_versions(client, name, previous, record.recorded_versions())
                if previous
                else []
            )
            if stale:
                logger.warning(
                    "removed versions %s of %s that run %s of an interrupted attempt at task %d registered",
                    stale,
                    name,
                    previous,
                    record.task_index,
                )
            record_attempt(db, increment_id, run_id)
        finally:
            db.dispose()

    def move_aliases(self, version: str, decision: promotion.GateDecision) -> None:
        """``candidate`` always; ``champion`` only when the gate passed (recorded in the ledger)."""
        client = runs.configure(self.settings)
        name = runs.model_name(self.scope.learner)
        promotion.set_alias(client, name, promotion.CANDIDATE, version)
        if decision.promote:
            promotion.set_alias(client, name, promotion.CHAMPION, version)
            move = ChampionMove(
                version=version, previous=decision.champion_version, actor="gate", reason="; ".join(decision.reasons)
            )
            db = migrated_engine(self.settings.ledger_url)
            try:
                record_promotion(db, self.scope.learner_id, move)
            finally:
                db.dispose()

    def _run_tags(self, record: IncrementRecord) -> dict[str, str]:
        """The child run's tags: whose increment, of which data version, after which version, through the gate?"""
        return {
            "strata.learner": self.scope.learner,
            "strata.task_index": str(record.task_index),
            "strata.batch_id": record.data.name,
            "strata.dvc_md5": record.data.md5,
            "strata.git_rev": record.data.git_rev,
            "strata.prefect_flow_run_id": self.scope.flow_run_id,
            "strata.parent_version": str(record.history[-1].model_version) if record.history else "",
            "strata.gate": "pass" if record.decision.promote else "fail",
        }

    @staticmethod
    def _version_tags(record: IncrementRecord) -> dict[str, str]:
        return {
            "strata.task_index": str(record.task_index),
            "strata.batch_id": record.data.name,
            "strata.dvc_md5": record.data.md5,
            "strata.classes": ",".join(record.model.class_names)[:5000],
        }
