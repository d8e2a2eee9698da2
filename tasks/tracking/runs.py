"""MLflow tracking for learners: one parent run per ``learn``, one child run per increment, one
registered model version per increment (``strata-<learner>``).

The store comes from settings: the workspace's SQLite database by default (artifacts under
``.strata/mlartifacts``), or any tracking server (``http://…`` in front of PostgreSQL and S3).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.models import infer_signature
from pydantic import BaseModel, ConfigDict

from strata.tasks.tracking.figures import IncrementFigures
from strata.tasks.workspace.identity import (
    ID_TAG,
    LEARNER_TAG,
    SERVER_SCHEMES,
    open_mlflow_store,
    open_workspace,
    store_lock,
)
from strata.tasks.workspace.settings import StrataSettings, redact_url

DISTRIBUTION = "strata-cil"  # the PyPI name (plain "strata" is an unrelated project there)
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def model_name(learner: str) -> str:
    return f"strata-{learner}"


def experiment_name(learner: str) -> str:
    return f"strata/{learner}"


def configure(settings: StrataSettings) -> MlflowClient:
    """Point MLflow (tracking and registry) at the workspace's store.

    MLflow writes "View run at <tracking URI>/…" to stdout after each run on a server; a URI carrying a
    password would put it in every log, so the links are suppressed for such a URI.

    MLflow creates a database store on first use by running its whole migration history, unguarded: two
    processes doing it at once on an empty database fail ("duplicate column name", "table
    _alembic_tmp_tags already exists" on SQLite, which is left half-migrated and unusable; a unique
    violation on PostgreSQL), and the first ``learn`` runs of a new workspace do start together. So the
    client, which opens the store, is made under a lock in the workspace's state folder: one process
    creates the store, the others wait and find it ready. A tracking server guards its own store.

    Before that, the store is checked to be this workspace's and intact (``identity.open_mlflow_store``):
    MLflow would silently start an empty store over a lost or 0-byte one.
    """
    open_mlflow_store(settings)
    uri = settings.mlflow_tracking_uri
    if redact_url(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith(SERVER_SCHEMES):
        return MlflowClient(uri, uri)
    with store_lock(settings):
        return MlflowClient(uri, uri)


def experiment_id(client: MlflowClient, settings: StrataSettings, learner: str) -> str:
    """The learner's experiment, created on first use with the workspace's id and its artifact root under the
    workspace as it is now (``identity`` rewrites it when the workspace moves or is copied)."""
    name = experiment_name(learner)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local_store = not settings.mlflow_tracking_uri.startswith(SERVER_SCHEMES)
    location = Path(settings.mlflow_artifacts).resolve().as_uri() if local_store else None
    tags = {LEARNER_TAG: learner, ID_TAG: open_workspace(settings).id}
    return client.create_experiment(name, artifact_location=location, tags=tags)


@contextmanager
def learn_run(client: MlflowClient, settings: StrataSettings, learner: str, tags: dict[str, str]) -> Iterator[str]:
    """The parent run of one ``learn`` invocation; yields its run id."""
    with mlflow.start_run(
        experiment_id=experiment_id(client, settings, learner),
        run_name=f"learn {learner}",
        tags={"strata.learner": learner, **tags},
    ) as run:
        yield run.info.run_id


def end_interrupted_runs(client: MlflowClient, learner: str) -> list[str]:
    """Mark the learner's runs still ``RUNNING`` as ``KILLED``; returns their ids.

    Called under the learner's lease, where no other run of this learner is live: such a run belongs
    to a ``learn`` that was killed, and would otherwise show as running in the MLflow UI forever.
    """
    experiment = client.get_experiment_by_name(experiment_name(learner))
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in runs]


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested config → ``a.b.c`` params (MLflow params are flat strings)."""
    if isinstance(value, dict):
        items: dict[str, Any] = {}
        for key, inner in value.items():
            items.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return items
    return {prefix: value}


class MethodParams(BaseModel):
    """An increment's run params: the method and its resolved config, the backbone and its weights, the seed."""

    model_config = ConfigDict(frozen=True)

    method: str
    config: dict[str, Any]
    backbone: str
    backbone_source: str
    weights_fingerprint: str
    seed: int


class DataInput(BaseModel):
    """The data version an increment learned, as the run's dataset input: where it is and which DVC md5 and git
    revision it was pinned at."""

    model_config = ConfigDict(frozen=True)

    uri: str
    name: str
    md5: str
    git_rev: str


class IncrementLog(BaseModel):
    """What one increment's child run holds: params, tags, its figures at step = task index, the training losses
    per epoch, the data input, the report files and the state folder (artifacts ``state/``)."""

    model_config = ConfigDict(frozen=True)

    params: MethodParams
    tags: dict[str, str]
    figures: IncrementFigures
    losses: list[float]
    data: DataInput
    files: list[Path]
    state_dir: Path


class ModelPackage(BaseModel):
    """What a registered version is made of: the state folder, the classes it predicts, the image size of its
    input example and the backbone weights file its pyfunc loads (None: timm's)."""

    model_config = ConfigDict(frozen=True)

    state_dir: Path
    class_names: list[str]
    image_size: int
    weights: str | None


def log_increment(log: IncrementLog) -> None:
    """Log one increment into the active child run."""
    mlflow.log_params({k: str(v)[:6000] for k, v in flatten("", log.params.model_dump(mode="json")).items()})
    mlflow.set_tags(log.tags)
    mlflow.log_metrics(log.figures.step_metrics(), step=log.figures.task_index)
    for epoch, loss in enumerate(log.losses):
        mlflow.log_metric("train_loss", loss, step=epoch)
    with warnings.catch_warnings():  # two registered local sources match a path; both are the same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(log.data.uri)
    mlflow.log_input(
        # mlflow's Dataset declares profile abstract but is no ABC at run time; MetaDataset leaves it unset
        MetaDataset(source, name=log.data.name, digest=log.data.md5[:36]),  # type: ignore[abstract]
        context="training",
        tags={"git_rev": log.data.git_rev, "dvc_md5": log.data.md5},
    )
    for path in log.files:
        mlflow.log_artifact(str(path))
    mlflow.log_artifacts(str(log.state_dir), artifact_path="state")


def log_parent_metrics(client: MlflowClient, parent_run_id: str, figures: IncrementFigures) -> None:
    """The parent run carries the learner's curve across all increments of this invocation."""
    for key in ("accuracy", "average_incremental_accuracy"):
        client.log_metric(parent_run_id, key, getattr(figures, key), step=figures.task_index)


def log_and_register(learner: str, model: ModelPackage, tags: dict[str, str]) -> str:
    """Log the pyfunc (models from code, signature + input example) and register it; returns the version."""
    size = model.image_size
    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    signature = infer_signature(example, np.array(model.class_names[:1] * len(example)))
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),
        artifacts={"state": str(model.state_dir)},
        signature=signature,
        input_example=example,
        model_config={"weights": model.weights} if model.weights else None,
        pip_requirements=[f"{DISTRIBUTION}=={metadata.version(DISTRIBUTION)}"],
    )
    version = mlflow.register_model(info.model_uri, model_name(learner), tags=tags)
    return str(version.version)
