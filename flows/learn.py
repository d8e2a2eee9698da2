"""The ``learn`` flow: each data version a learner has not learned yet becomes its next increment.

Under the learner's lease (two runs of one learner never overlap), for every pending version in
ingestion order: load the last good state → train the new task → evaluate on the test splits of all
learned batches → write the state → gate → log to MLflow and register a version → commit the
increment in the ledger → move the aliases. The ledger, MLflow and registry writes, in that order, are
``strata.tasks.tracking.recorder``'s. A step that raises marks the increment failed and leaves the
ledger's last good state and the ``champion`` alias untouched; the next ``learn`` retries it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from strata.models.backbones import build_backbone
from strata.models.engine import Engine, seed_everything
from strata.models.evaluation import evaluate
from strata.models.methods import Method, create_method, method_config
from strata.models.metrics import accuracy_matrix, summarize
from strata.models.streams import LabelledDataset, Stream, stream_from_batches
from strata.tasks.data.materialise import materialise
from strata.tasks.ledger.increments import (
    LearnedTask,
    LearnerConfigError,
    configure_learner,
    fail_interrupted_increments,
    learned_tasks,
    pending_versions,
)
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.ledger.store import LEARNER_NAME, Learner, learner_lease, ledger_session, process_holder
from strata.tasks.orchestration.artifacts import TrainingProgress, accuracy_table, increment_summary
from strata.tasks.orchestration.gpu_slots import gpu_slots
from strata.tasks.tracking import promotion, runs
from strata.tasks.tracking.figures import IncrementMetrics, LearnerFigures
from strata.tasks.tracking.recorder import IncrementRecord, IncrementRecorder, RecordedIncrement, RecorderScope, Step
from strata.tasks.tracking.reports import CURVE_FILE, MATRIX_FILE, write_report
from strata.tasks.training.feature_cache import DiskFeatureCache, features_folder
from strata.tasks.training.launcher import TrainJob, train_on_processes
from strata.tasks.workspace.identity import open_workspace
from strata.tasks.workspace.settings import StrataSettings, load_settings, redact_url
from strata.tasks.workspace.setup import find_workspace

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LearnParams(BaseModel):
    """What ``strata learn`` runs; typed so the Prefect UI renders a form for deployments."""

    model_config = ConfigDict(extra="forbid")

    learner: str = Field(description="learner name; created on first use", pattern=LEARNER_NAME)
    method: str | None = Field(None, description="method on first learn (default simplecil); fixed afterwards")
    backbone: str | None = Field(None, description="backbone on first learn (default tiny); fixed afterwards")
    weights: str | None = Field(None, description="local weights file of the backbone")
    config: dict[str, Any] = Field(default_factory=dict, description="method-config overrides on first learn")
    gate: promotion.GateConfig = promotion.GateConfig()
    seed: int = 0
    device: str | None = None
    processes: int = Field(
        1,
        ge=1,
        description="training processes per increment, data-parallel: one per GPU "
        "(NCCL), or gloo on CPU; each holds a slot of the `gpu` concurrency limit",
    )
    workspace: str | None = Field(None, description="workspace root; default: the one containing the cwd")
    lease_minutes: int = Field(120, gt=0, description="lease length; a crashed run's lease expires after it")
    show_progress: bool = True


class LearnerSpec(BaseModel):
    """How a learner learns: method, backbone and method-config overrides as the ledger fixed them at its first
    learn, and the backbone weights file this call loads."""

    model_config = ConfigDict(frozen=True)

    method: str
    backbone: str
    weights: str | None
    config: dict[str, Any]

    @classmethod
    def of(cls, learner: Learner, weights: str | None) -> LearnerSpec:
        """From the ledger's row, whose method and backbone ``configure_learner`` has fixed, and the call's weights."""
        return cls.model_validate(
            {
                "method": learner.method,
                "backbone": learner.backbone,
                "weights": weights,
                "config": learner.method_config,
            }
        )

    def build(self) -> Method:
        return create_method(self.method, build_backbone(self.backbone, self.weights), overrides=self.config)


class PendingVersion(BaseModel):
    """A data version the learner has not learned yet, as read from the ledger under the lease."""

    model_config = ConfigDict(frozen=True)

    id: int
    batch_id: str
    md5: str
    git_rev: str
    path: str

    def data_input(self, workspace: Path) -> runs.DataInput:
        return runs.DataInput(uri=str(workspace / self.path), name=self.batch_id, md5=self.md5, git_rev=self.git_rev)


class LearnerBacklog(BaseModel):
    """The learner as the ledger holds it under the lease: its id and spec, what it learned, what is pending."""

    model_config = ConfigDict(frozen=True)

    learner_id: int
    spec: LearnerSpec
    history: list[LearnedTask]
    pending: list[PendingVersion]


class LearnedVersion(BaseModel):
    task: int
    batch_id: str
    version: str
    accuracy: float
    promoted: bool

    def summary(self) -> str:
        verdict = "champion" if self.promoted else "not promoted"
        return f"task {self.task} ({self.batch_id}) → version {self.version}, {verdict}"


class LearnResult(BaseModel):
    """What ``learn`` returns (as a dict): the versions learned by this call and the learner's task count."""

    learner: str
    learned: list[LearnedVersion]
    tasks: int


@dataclass
class Learning:
    """Everything one invocation carries from increment to increment; only the flow's own code changes it."""

    settings: StrataSettings
    params: LearnParams
    spec: LearnerSpec
    method: Method
    engine: Engine
    history: list[LearnedTask]
    datasets: list[LabelledDataset]
    recorder: IncrementRecorder


@task(name="materialise", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def materialise_version(settings: StrataSettings, batch_id: str) -> LabelledDataset:
    """Pull a data version through DVC and verify its md5 (retried: it is I/O)."""
    return materialise(settings, batch_id)


@task(name="train", cache_policy=NONE)
def train(run: Learning, stream: Stream) -> tuple[Method, list[float]]:
    """Learn the stream's newest task (never retried: a failure here is a bug or bad data); returns the trained
    method and its losses per epoch.

    Holds one slot of the ``gpu`` global concurrency limit (``strata deploy --gpu-slots``) per training
    process, so scheduled and triggered runs of different learners share the accelerators; no limit, no
    wait. With ``processes`` > 1 the task is trained data-parallel by that many processes
    (``strata.tasks.training.launcher``) and the method comes back rebuilt from the state they wrote.
    """
    processes = run.params.processes
    with gpu_slots(processes):
        if processes == 1:
            losses = run.method.learn(stream.tasks[-1], run.engine)
            return run.method, losses
        with tempfile.TemporaryDirectory(prefix="strata-trained-") as scratch:
            job = TrainJob(
                task=stream.tasks[-1],
                method=run.method.name,
                backbone=run.method.backbone.info.name,
                out=scratch,
                weights=run.spec.weights,
                config=run.method.config.model_dump(mode="json"),
                state=str(run.settings.resolve(run.history[-1].checkpoint_uri)) if run.history else None,
                seed=run.params.seed,
                device=run.engine.device.type,
                feature_cache=str(features_folder(run.settings)),
            )
            method, losses = train_on_processes(job, processes)
        method.to(run.engine.device)
        return method, losses


@task(name="evaluate", cache_policy=NONE)
def evaluate_seen(method: Method, stream: Stream, engine: Engine) -> list[float]:
    return evaluate(method, stream.tasks, engine).accuracies


@task(name="save-state", retries=2, cache_policy=NONE)
def save_state(method: Method, directory: Path) -> Path:
    return method.save_state(directory)


def run_as_task(step: Step, write: Callable[..., T], /, *args: Any) -> T:
    """The recorder's retriable steps run as Prefect tasks: retried, and shown in the flow run by name."""
    return task(name=step.name, retries=step.retries, retry_delay_seconds=2, cache_policy=NONE)(write)(*args)


def learn_task(run: Learning, stream: Stream, version: PendingVersion, folder: Path) -> IncrementRecord:
    """Train the stream's newest task, evaluate all learned ones, save the state, write the report, gate."""
    new = stream.tasks[-1]
    run.engine.on_epoch_end = TrainingProgress(run.params.learner, new.index)
    run.method, losses = train(run, stream)
    row = evaluate_seen(run.method, stream, run.engine)
    sizes = [len(t.test) for t in stream.tasks]
    rows = [IncrementMetrics.model_validate(t.metrics).row for t in run.history] + [row]
    figures = LearnerFigures.model_validate(summarize(accuracy_matrix(rows), np.array(sizes)))
    state_dir = save_state(run.method, folder / "state")
    report = write_report(
        folder / "report",
        {**figures.model_dump(), "method": run.method.name, "learner": run.params.learner},
        f"{run.params.learner} ({run.method.name}) after task {new.index}",
    )
    candidate = promotion.CandidateFigures(row=row, test_sizes=figures.test_sizes, accuracy=figures.accuracy[new.index])
    champion = promotion.champion_figures(
        runs.configure(run.settings), runs.model_name(run.params.learner), run.history
    )
    backbone = run.method.backbone
    return IncrementRecord(
        task_index=new.index,
        data=version.data_input(run.settings.workspace),
        new_classes=list(new.class_names),
        first_class_id=new.num_old,
        history=run.history,
        params=runs.MethodParams(
            method=run.method.name,
            config=run.method.config.model_dump(mode="json"),
            backbone=backbone.info.name,
            backbone_source=backbone.info.source,
            weights_fingerprint=backbone.info.fingerprint,
            seed=run.params.seed,
        ),
        row=row,
        figures=figures,
        losses=losses,
        decision=promotion.decide(run.params.gate, candidate, champion),
        report=list(report.values()),
        model=runs.ModelPackage(
            state_dir=state_dir,
            class_names=list(run.method.class_names),
            image_size=backbone.image_size,
            weights=run.spec.weights,
        ),
    )


def learn_increment(run: Learning, version: PendingVersion) -> RecordedIncrement:
    """One increment, learned and recorded (``IncrementRecorder.record``), then shown in the Prefect UI."""
    run.datasets.append(materialise_version(run.settings, version.batch_id))
    stream = stream_from_batches(run.params.learner, run.datasets)
    index = stream.tasks[-1].index
    folder = run.settings.state_dir / "increments" / run.params.learner / f"task-{index:03d}"
    recorded = run.recorder.record(index, version.id, lambda: learn_task(run, stream, version, folder))
    run.history.append(recorded.learned_task())
    record = recorded.record
    accuracy_table(run.params.learner, record.figures.model_dump())
    increment_summary(
        run.params.learner,
        index,
        record.figures.model_dump(),
        record.decision.reasons,
        record.decision.promote,
        recorded.version,
        f"run {recorded.run_id} in {redact_url(run.settings.mlflow_tracking_uri)}",
        [folder / "report" / CURVE_FILE, folder / "report" / MATRIX_FILE],
    )
    return recorded


@flow(name="learn")
def learn(params: LearnParams) -> dict[str, Any]:
    """Learn every pending data version of ``params.learner``; returns what was learned."""
    settings = load_settings(params.workspace or find_workspace())
    open_workspace(settings)  # this workspace's stores, intact (a deployment run comes here without the CLI)
    db = migrated_engine(settings.ledger_url)
    try:
        with ledger_session(db) as session:  # a config the method rejects rolls this back: nothing is stored
            learner = configure_learner(session, params.learner, params.method, params.backbone, params.config)
            check_method_config(learner, asked=bool(params.config))
            learner_id = learner.id
        holder = process_holder(str(flow_run.get_id() or "local"))
        with learner_lease(db, learner_id, holder, timedelta(minutes=params.lease_minutes)):
            with ledger_session(db) as session:  # read again under the lease: another run may have learned
                learner = configure_learner(session, params.learner, params.method, params.backbone, params.config)
                interrupted = fail_interrupted_increments(session, learner)
                backlog = LearnerBacklog(
                    learner_id=learner_id,
                    spec=LearnerSpec.of(learner, params.weights),
                    history=learned_tasks(session, learner),
                    pending=[
                        PendingVersion(id=v.id, batch_id=v.batch_id, md5=v.md5, git_rev=v.git_rev, path=v.path)
                        for v in pending_versions(session, learner)
                    ],
                )
            if interrupted:
                logger.warning(
                    "learner %s: tasks %s were left running by a run that died; learning them again",
                    params.learner,
                    interrupted,
                )
            if not backlog.pending:
                logger.info("learner %s has nothing new to learn", params.learner)
                return LearnResult(learner=params.learner, learned=[], tasks=len(backlog.history)).model_dump()
            return _learn_pending(settings, params, backlog).model_dump()
    finally:
        db.dispose()


def check_method_config(learner: Learner, asked: bool) -> None:
    """Refuse a method config the learner's method rejects, before a row holding it is committed (a stored bad
    config would fail every later ``learn`` of the learner)."""
    try:
        method_config(learner.method or "simplecil", learner.method_config)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'config'}: {error['msg']}" for error in exc.errors()
        )
        source = "--config" if asked else f"the stored method config of learner {learner.name!r}"
        raise LearnerConfigError(
            f"{source} {json.dumps(learner.method_config)} is not a valid {learner.method} config ({problems}); "
            "fix or drop those keys in --config and run strata learn again"
        ) from exc


def _learn_pending(settings: StrataSettings, params: LearnParams, backlog: LearnerBacklog) -> LearnResult:
    seed_everything(params.seed)
    method = backlog.spec.build()
    if backlog.history:
        method.load_state(settings.resolve(backlog.history[-1].checkpoint_uri))
    engine = Engine(
        params.device or settings.device or None,
        seed=params.seed,
        show_progress=params.show_progress,
        feature_cache=DiskFeatureCache(features_folder(settings)),
    )
    datasets = [materialise_version(settings, t.batch_id) for t in backlog.history]
    client = runs.configure(settings)
    if killed := runs.end_interrupted_runs(client, params.learner):
        logger.warning(
            "marked MLflow runs %s of learner %s KILLED: their learn ended without closing them", killed, params.learner
        )
    flow_run_id = str(flow_run.get_id() or "")
    learned: list[LearnedVersion] = []
    with runs.learn_run(client, settings, params.learner, {"strata.prefect_flow_run_id": flow_run_id}) as parent_run_id:
        scope = RecorderScope(
            learner=params.learner, learner_id=backlog.learner_id, parent_run_id=parent_run_id, flow_run_id=flow_run_id
        )
        recorder = IncrementRecorder(settings, scope, runs.log_and_register, run_as_task)
        run = Learning(settings, params, backlog.spec, method, engine, list(backlog.history), datasets, recorder)
        for version in backlog.pending:
            try:
                recorded = learn_increment(run, version)
            except Exception as exc:
                if learned:  # the CLI prints notes before the error: what this call recorded before it failed
                    done = "; ".join(f"learned {item.summary()}" for item in learned)
                    exc.add_note(f"{done}; task {len(run.history)} ({version.batch_id}) failed:")
                raise
            learned.append(
                LearnedVersion(
                    task=recorded.record.task_index,
                    batch_id=version.batch_id,
                    version=recorded.version,
                    accuracy=recorded.record.metrics().accuracy,
                    promoted=recorded.record.decision.promote,
                )
            )
    return LearnResult(learner=params.learner, learned=learned, tasks=len(run.history))
