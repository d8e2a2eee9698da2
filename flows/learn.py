"""The ``learn`` flow: each data version a learner has not learned yet becomes its next increment.

Under the learner's lease (two runs of one learner never overlap), for every pending version in
ingestion order: load the last good state → train the new task → evaluate on the test splits of all
learned batches → write the state → log to MLflow and register a version → gate → commit the
increment in the ledger → move the aliases. A step that raises marks the increment failed and leaves
the ledger's last good state and the ``champion`` alias untouched; the next ``learn`` retries it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from strata.models.backbones import build_backbone
from strata.models.engine import Engine, seed_everything
from strata.models.evaluation import evaluate
from strata.models.methods import Method, create_method
from strata.models.metrics import accuracy_matrix, summarize
from strata.models.streams import LabelledDataset, Stream, stream_from_batches
from strata.tasks.data.materialise import materialise
from strata.tasks.ledger.increments import (
    LearnedTask,
    configure_learner,
    fail_increment,
    fail_interrupted_increments,
    finish_increment,
    learned_tasks,
    pending_versions,
    record_promotion,
    start_increment,
)
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.ledger.store import LEARNER_NAME, learner_lease, ledger_session, process_holder
from strata.tasks.orchestration.artifacts import TrainingProgress, accuracy_table, increment_summary
from strata.tasks.orchestration.gpu_slots import gpu_slots
from strata.tasks.tracking import promotion, runs
from strata.tasks.tracking.reports import write_report
from strata.tasks.training.feature_cache import DiskFeatureCache
from strata.tasks.training.launcher import TrainJob, train_on_processes
from strata.tasks.workspace.settings import StrataSettings, load_settings, redact_url
from strata.tasks.workspace.setup import find_workspace

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PendingVersion:
    id: int
    batch_id: str
    md5: str
    git_rev: str
    path: str


@dataclass
class Learning:
    """Everything one invocation carries from increment to increment."""

    settings: StrataSettings
    params: LearnParams
    learner: str
    learner_id: int
    method: Method
    engine: Engine
    history: list[LearnedTask]
    datasets: list[LabelledDataset]
    parent_run_id: str = ""


@task(name="materialise", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def materialise_version(settings: StrataSettings, batch_id: str) -> LabelledDataset:
    """Pull a data version through DVC and verify its md5 (retried: it is I/O)."""
    return materialise(settings, batch_id)


@task(name="train", cache_policy=NONE)
def train(run: Learning, stream: Stream) -> list[float]:
    """Learn the stream's newest task (never retried: a failure here is a bug or bad data).

    Holds one slot of the ``gpu`` global concurrency limit (``strata deploy --gpu-slots``) per training
    process, so scheduled and triggered runs of different learners share the accelerators; no limit, no
    wait. With ``processes`` > 1 the task is trained data-parallel by that many processes
    (``strata.tasks.training.launcher``) and the flow goes on from the state they wrote.
    """
    processes = run.params.processes
    with gpu_slots(processes):
        if processes == 1:
            return run.method.learn(stream.tasks[-1], run.engine)
        with tempfile.TemporaryDirectory(prefix="strata-trained-") as scratch:
            job = TrainJob(
                task=stream.tasks[-1],
                method=run.method.name,
                backbone=run.method.backbone.info.name,
                out=scratch,
                weights=run.params.weights,
                config=run.method.config.model_dump(mode="json"),
                state=run.history[-1].checkpoint_uri if run.history else None,
                seed=run.params.seed,
                device=run.engine.device.type,
                feature_cache=str(run.engine.feature_cache.folder),
            )
            run.method, losses = train_on_processes(job, processes)
        run.method.to(run.engine.device)
        return losses


@task(name="evaluate", cache_policy=NONE)
def evaluate_seen(method: Method, stream: Stream, engine: Engine) -> list[float]:
    return evaluate(method, stream.tasks, engine).accuracies


@task(name="save-state", retries=2, cache_policy=NONE)
def save_state(method: Method, directory: Path) -> Path:
    return method.save_state(directory)


@task(name="track-and-register", retries=1, retry_delay_seconds=2, cache_policy=NONE)
def track_and_register(
    run: Learning,
    task_index: int,
    version: PendingVersion,
    summary: dict,
    losses: list[float],
    decision: promotion.GateDecision,
    state_dir: Path,
    files: list[Path],
) -> tuple[str, str]:
    """Child run with params, metrics at step t, data input, plots, state; then one registered version."""
    client = runs.configure(run.settings)
    name = runs.model_name(run.learner)
    method = run.method
    tags = {
        "strata.learner": run.learner,
        "strata.task_index": str(task_index),
        "strata.batch_id": version.batch_id,
        "strata.dvc_md5": version.md5,
        "strata.git_rev": version.git_rev,
        "strata.prefect_flow_run_id": str(flow_run.get_id() or ""),
        "strata.parent_version": run.history[-1].model_version if run.history else "",
        "strata.gate": "pass" if decision.promote else "fail",
    }
    params = {
        "method": method.name,
        "config": method.config.model_dump(mode="json"),
        "backbone": method.backbone.info.name,
        "backbone_source": method.backbone.info.source,
        "weights_fingerprint": method.backbone.info.fingerprint,
        "seed": run.params.seed,
    }
    data = {
        "uri": str(run.settings.workspace / version.path),
        "name": version.batch_id,
        "md5": version.md5,
        "git_rev": version.git_rev,
    }
    recorded = {t.model_version for t in run.history if t.model_version}
    # explicit parent and experiment: Prefect may run this task on another thread than the flow's, and
    # MLflow's active-run stack is per thread
    parent = client.get_run(run.parent_run_id)
    with mlflow.start_run(
        experiment_id=parent.info.experiment_id,
        parent_run_id=run.parent_run_id,
        nested=True,
        run_name=f"task {task_index} ({version.batch_id})",
    ) as child:
        runs.log_increment(task_index, params, summary, losses, tags, data, files, state_dir)
        mlflow.log_dict({"promote": decision.promote, "reasons": decision.reasons}, "gate.json")
        stale = promotion.remove_unrecorded_versions(client, name, task_index, recorded)
        if stale:
            logger.warning(
                "removed versions %s of %s left by an interrupted attempt at task %d", stale, name, task_index
            )
        size = method.backbone.image_size
        example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
        registered = runs.log_and_register(
            run.learner,
            state_dir,
            example,
            method.class_names,
            run.params.weights,
            tags={
                "strata.task_index": str(task_index),
                "strata.batch_id": version.batch_id,
                "strata.dvc_md5": version.md5,
                "strata.classes": ",".join(method.class_names)[:5000],
            },
        )
        run_id = child.info.run_id
    runs.log_parent_metrics(client, run.parent_run_id, task_index, summary)
    return run_id, registered


@task(name="move-aliases", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def move_aliases(run: Learning, version: str, decision: promotion.GateDecision) -> None:
    """``candidate`` always; ``champion`` only when the gate passed (recorded in the ledger)."""
    client = runs.configure(run.settings)
    name = runs.model_name(run.learner)
    promotion.set_alias(client, name, promotion.CANDIDATE, version)
    if decision.promote:
        promotion.set_alias(client, name, promotion.CHAMPION, version)
        db = migrated_engine(run.settings.ledger_url)
        try:
            record_promotion(
                db, run.learner_id, version, decision.champion_version, "gate", "; ".join(decision.reasons)
            )
        finally:
            db.dispose()


def champion_figures(run: Learning) -> tuple[str | None, int | None, float | None]:
    """(version, task index, A_t) of the current champion, from the registry alias and the ledger."""
    client = runs.configure(run.settings)
    version = promotion.alias_version(client, runs.model_name(run.learner), promotion.CHAMPION)
    for learned in run.history:
        if learned.model_version == version:
            return version, learned.task_index, learned.metrics["accuracy"]
    return version, None, None


def learn_increment(run: Learning, version: PendingVersion) -> dict[str, Any]:
    """One increment; returns its ledger metrics."""
    run.datasets.append(materialise_version(run.settings, version.batch_id))
    stream = stream_from_batches(run.learner, run.datasets)
    new = stream.tasks[-1]
    db = migrated_engine(run.settings.ledger_url)
    increment_id = start_increment(db, run.learner_id, new.index, version.id)
    try:
        run.engine.on_epoch_end = TrainingProgress(run.learner, new.index)
        losses = train(run, stream)
        row = evaluate_seen(run.method, stream, run.engine)
        sizes = [len(t.test) for t in stream.tasks]
        summary = summarize(accuracy_matrix([t.metrics["row"] for t in run.history] + [row]), np.array(sizes))
        folder = run.settings.state_dir / "increments" / run.learner / f"task-{new.index:03d}"
        state_dir = save_state(run.method, folder / "state")
        report = write_report(
            folder / "report",
            {**summary, "method": run.method.name, "learner": run.learner},
            f"{run.learner} ({run.method.name}) after task {new.index}",
        )
        decision = promotion.decide(run.params.gate, row, sizes, summary["accuracy"][new.index], *champion_figures(run))
        run_id, registered = track_and_register(
            run, new.index, version, summary, losses, decision, state_dir, list(report.values())
        )
        metrics = {
            "row": row,
            "test_sizes": sizes,
            "accuracy": summary["accuracy"][new.index],
            "average_incremental_accuracy": summary["average_incremental_accuracy"],
            "forgetting": summary["forgetting"][new.index],
            "train_losses": losses,
            "gate": decision.reasons,
            "promoted": decision.promote,
        }
        finish_increment(
            db, increment_id, list(new.class_names), new.num_old, str(state_dir), metrics, run_id, registered
        )
    except BaseException as exc:
        fail_increment(db, increment_id, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        db.dispose()
    run.history.append(LearnedTask(new.index, version.batch_id, str(state_dir), metrics, registered, run_id))
    move_aliases(run, registered, decision)
    accuracy_table(run.learner, summary)
    increment_summary(
        run.learner,
        new.index,
        summary,
        decision.reasons,
        decision.promote,
        registered,
        f"run {run_id} in {redact_url(run.settings.mlflow_tracking_uri)}",
        [report["curve"], report["matrix"]],
    )
    return metrics


@flow(name="learn")
def learn(params: LearnParams) -> dict[str, Any]:
    """Learn every pending data version of ``params.learner``; returns what was learned."""
    settings = load_settings(params.workspace or find_workspace())
    db = migrated_engine(settings.ledger_url)
    try:
        with ledger_session(db) as session:
            learner = configure_learner(session, params.learner, params.method, params.backbone, params.config)
            learner_id = learner.id
        holder = process_holder(str(flow_run.get_id() or "local"))
        with learner_lease(db, learner_id, holder, timedelta(minutes=params.lease_minutes)):
            with ledger_session(db) as session:  # read again under the lease: another run may have learned
                learner = configure_learner(session, params.learner, params.method, params.backbone, params.config)
                interrupted = fail_interrupted_increments(session, learner)
                method_name, backbone_name, config = learner.method, learner.backbone, dict(learner.method_config)
                history = learned_tasks(session, learner)
                pending = [
                    PendingVersion(v.id, v.batch_id, v.md5, v.git_rev, v.path)
                    for v in pending_versions(session, learner)
                ]
            if interrupted:
                logger.warning(
                    "learner %s: tasks %s were left running by a run that died; learning them again",
                    params.learner,
                    interrupted,
                )
            if not pending:
                logger.info("learner %s has nothing new to learn", params.learner)
                return {"learner": params.learner, "learned": [], "tasks": len(history)}
            return _learn_pending(settings, params, learner_id, method_name, backbone_name, config, history, pending)
    finally:
        db.dispose()


def _learn_pending(
    settings: StrataSettings,
    params: LearnParams,
    learner_id: int,
    method_name: str,
    backbone_name: str,
    config: dict,
    history: list[LearnedTask],
    pending: list[PendingVersion],
) -> dict[str, Any]:
    seed_everything(params.seed)
    method = create_method(method_name, build_backbone(backbone_name, params.weights), overrides=config)
    if history:
        method.load_state(history[-1].checkpoint_uri)
    engine = Engine(
        params.device or settings.device or None,
        seed=params.seed,
        show_progress=params.show_progress,
        feature_cache=DiskFeatureCache(settings.state_dir / "cache" / "features"),
    )
    run = Learning(
        settings,
        params,
        params.learner,
        learner_id,
        method,
        engine,
        history,
        [materialise_version(settings, t.batch_id) for t in history],
    )
    client = runs.configure(settings)
    if killed := runs.end_interrupted_runs(client, params.learner):
        logger.warning(
            "marked MLflow runs %s of learner %s KILLED: their learn ended without closing them", killed, params.learner
        )
    learned = []
    with runs.learn_run(
        client, settings, params.learner, {"strata.prefect_flow_run_id": str(flow_run.get_id() or "")}
    ) as parent_run_id:
        run.parent_run_id = parent_run_id
        for version in pending:
            metrics = learn_increment(run, version)
            learned.append(
                {"batch_id": version.batch_id, "accuracy": metrics["accuracy"], "promoted": metrics["promoted"]}
            )
    return {"learner": params.learner, "learned": learned, "tasks": len(run.history)}
