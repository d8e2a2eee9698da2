"""The ``export`` flow: a registered version (or the one an alias points at) → one ONNX graph.

Rebuild the method from the version's state → export (dynamo, dynamic batch) → ``onnx.checker`` →
parity gate against PyTorch → ``labels.json`` + ``model.json`` → manifest, renamed into place
(``strata.tasks.export.layout.published``) → log the graph with the onnx flavor on the version's run and
tag the version. A failed parity gate raises before anything is logged or published.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from strata.tasks.export.layout import MODEL_FILE, manifest_problem, published
from strata.tasks.export.onnx_graph import export_method
from strata.tasks.export.registered import RegistrySource, download_state, log_onnx, resolve_version
from strata.tasks.export.triton import write_triton_repository
from strata.tasks.ledger.store import LEARNER_NAME
from strata.tasks.tracking import runs
from strata.tasks.training.restore import restore_method
from strata.tasks.workspace.identity import open_mlflow_store
from strata.tasks.workspace.settings import StrataSettings, load_settings
from strata.tasks.workspace.setup import find_workspace


class ExportParams(BaseModel):
    """What ``strata export`` runs; typed for the Prefect UI."""

    model_config = ConfigDict(extra="forbid")

    learner: str = Field(pattern=LEARNER_NAME)
    version: str | None = Field(None, description="registered version; default: the alias's")
    alias: str = Field("champion", description="alias to export when no version is given")
    fp16: bool = False
    opset: int = Field(18, ge=17)
    out: str | None = Field(None, description="output folder; default .strata/exports/<learner>/v<version>")
    preprocess_hw: tuple[int, int] | None = Field(None, description="bake the test transform in for uint8 HxW")
    triton: str | None = Field(None, description="also write a Triton model repository here")
    weights: str | None = Field(None, description="backbone weights file, if not from timm's cache")
    log_model: bool = Field(True, description="log the ONNX model on the version's run")
    workspace: str | None = None


def export_version(settings: StrataSettings, params: ExportParams) -> dict[str, Any]:
    client = runs.configure(settings)
    version = resolve_version(client, params.learner, params.version, params.alias)
    out = Path(params.out) if params.out else settings.state_dir / "exports" / params.learner / f"v{version}"
    with tempfile.TemporaryDirectory(prefix="strata-state-") as scratch:
        method = restore_method(
            download_state(client, settings, params.learner, version, Path(scratch)), params.weights
        )
    tags = client.get_model_version(runs.model_name(params.learner), version).tags
    workspace = open_mlflow_store(settings)
    with published(out) as folder:  # ``out`` appears complete, with its manifest, or not at all
        result = export_method(
            method,
            folder,
            params.opset,
            params.fp16,
            params.preprocess_hw,
            extra_meta={
                "version": version,
                "learner": params.learner,
                "data_version": tags.get("strata.batch_id"),
                "dvc_md5": tags.get("strata.dvc_md5"),
                "workspace_id": workspace.id if workspace else None,  # whose stores it came from
            },
        )
    report = {"version": version, "directory": str(out), "parity": result.meta["parity"]}
    if params.log_model:
        report["model_uri"] = log_onnx(client, params.learner, version, out / MODEL_FILE, out)
    if params.triton:
        triton = write_triton_repository(
            out / MODEL_FILE, Path(params.triton), runs.model_name(params.learner), int(version)
        )
        report["triton"] = str(triton)
    return report


@flow(name="export")
def export(params: ExportParams) -> dict[str, Any]:
    """Export one registered version of a learner to ONNX, gated on parity."""
    return export_version(load_settings(params.workspace or find_workspace()), params)


def registry_source(
    learner: str, alias: str = "champion", workspace: str | None = None, weights: str | None = None
) -> RegistrySource:
    """A model source for ``strata serve --learner``: the alias's version, exported on first use."""
    settings = load_settings(workspace or find_workspace())

    def ensure_export(version: str) -> Path:
        folder = settings.state_dir / "exports" / learner / f"v{version}"
        if manifest_problem(folder) is not None:  # absent, or left half-written by an export before this one
            export_version(
                settings, ExportParams(learner=learner, version=version, weights=weights, workspace=workspace)
            )
        return folder

    return RegistrySource(settings, learner, alias, ensure_export)
