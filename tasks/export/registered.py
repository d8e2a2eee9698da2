"""Registered versions ⇄ ONNX exports: resolve a version or alias, rebuild it, export it, log the
ONNX model (onnx flavor) on the version's run, and serve whatever an alias points at.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import onnx
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from strata.models.errors import UnavailableError, UserError
from strata.tasks.export.layout import manifest_problem
from strata.tasks.serving.sources import ModelRef, ModelSourceError
from strata.tasks.tracking import runs
from strata.tasks.workspace.settings import StrataSettings, redact_url

ONNX_ARTIFACT = "onnx"
ONNX_TAG = "strata.onnx_model_uri"
PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
NOT_IN_REGISTRY = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}  # the registry answered: no such name


class UnknownVersionError(UserError, ValueError):
    """The learner has no registered model, or not the version asked for; the message says where to look."""


class TrackingUnavailableError(UnavailableError):
    """The MLflow tracking store did not answer (server down, database unreachable); nothing was changed."""


def resolve_version(client: MlflowClient, learner: str, version: str | None, alias: str) -> str:
    """``version`` if given (checked), else the version ``alias`` points at.

    A name the registry does not know is the user's mistake and says so; a registry that does not
    answer is a TrackingUnavailableError, not "no such version".
    """
    name = runs.model_name(learner)
    if _lookup(client.get_registered_model, name) is None:
        raise UnknownVersionError(f"learner {learner!r} has no registered model ({name}) yet; see `strata status`")
    if version is not None:
        if _lookup(client.get_model_version, name, version) is None:
            raise UnknownVersionError(f"{name} has no version {version}; see `strata status --learner {learner}`")
        return version
    resolved = _lookup(client.get_model_version_by_alias, name, alias)
    if resolved is None:
        raise ModelSourceError(f"{name} has no version with alias {alias!r}; see `strata status --learner {learner}`")
    return str(resolved.version)


def _lookup(get: Callable[..., Any], *args: str) -> Any | None:
    """What the registry's ``get`` returns, or None when the registry answers that it has no such entry."""
    try:
        return get(*args)
    except MlflowException as exc:
        if exc.error_code in NOT_IN_REGISTRY:
            return None
        raise TrackingUnavailableError(
            f"the MLflow tracking store at {redact_url(mlflow.get_tracking_uri())} did not answer ({exc.message}); "
            "start it or fix mlflow_tracking_uri in strata.toml (STRATA_MLFLOW_TRACKING_URI)"
        ) from exc


def download_state(client: MlflowClient, settings: StrataSettings, learner: str, version: str, into: Path) -> Path:
    """The state files logged with the version's run (works for local stores and tracking servers)."""
    run_id = client.get_model_version(runs.model_name(learner), version).run_id
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="state", dst_path=str(into), tracking_uri=settings.mlflow_tracking_uri
        )
    )


def log_onnx(client: MlflowClient, learner: str, version: str, model_path: Path, export_dir: Path) -> str:
    """Log the exported graph with MLflow's onnx flavor in the version's run; tag the version with it."""
    name = runs.model_name(learner)
    run_id = client.get_model_version(name, version).run_id
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(model_path)), name=ONNX_ARTIFACT, onnx_execution_providers=PROVIDERS)
        mlflow.log_artifacts(str(export_dir), artifact_path=f"{ONNX_ARTIFACT}-export")
    client.set_model_version_tag(name, version, ONNX_TAG, info.model_uri)
    return info.model_uri


class RegistrySource:
    """Serve what an alias (``champion``) points at; a version without a complete export is exported on first use.

    ``export(version) -> directory`` is given by the caller (the export flow), so this stays a plain
    lookup: alias → version → export directory under the workspace.
    """

    def __init__(self, settings: StrataSettings, learner: str, alias: str, export: Callable[[str], Path]):
        self.settings, self.learner, self.alias, self.export = settings, learner, alias, export
        self._exported: dict[str, Path] = {}

    def current(self) -> ModelRef:
        client = runs.configure(self.settings)
        version = resolve_version(client, self.learner, None, self.alias)
        folder = self._exported.get(version)
        if folder is None or manifest_problem(folder) is not None:  # a folder deleted or damaged since: again
            folder = self._exported[version] = self.export(version)
        return ModelRef(version, folder)
