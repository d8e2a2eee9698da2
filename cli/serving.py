"""``strata export`` and ``serve``: registered versions to ONNX, and the HTTP server over them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from strata.cli.common import (
    WorkspaceOption,
    _registered_version,
    _size_option,
    app,
    console,
    require_workspace,
)

OPSETS = (17, 23)  # the oldest ExportParams takes, the newest torch writes (above it torch quietly writes 18)


@app.command()
def export(
    learner: Annotated[str, typer.Option(help="learner name")],
    version: Annotated[str | None, typer.Option(help="registered version [default: the alias's]")] = None,
    alias: Annotated[str, typer.Option(help="alias to export when no version is given")] = "champion",
    fp16: Annotated[bool, typer.Option(help="half-precision weights and compute (looser parity bound)")] = False,
    opset: Annotated[int, typer.Option(min=OPSETS[0], max=OPSETS[1], help="ONNX opset")] = 18,
    out: Annotated[
        Path | None, typer.Option(help="output folder [default: .strata/exports/<learner>/v<version>]")
    ] = None,
    with_preprocess: Annotated[
        str | None, typer.Option(help="bake the test transform in for uint8 HxW images, e.g. 256x256")
    ] = None,
    triton: Annotated[Path | None, typer.Option(help="also write a Triton model repository here")] = None,
    weights: Annotated[Path | None, typer.Option(help="backbone weights file")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Export a registered version to ONNX (parity-gated) and log it on the version (onnx flavor)."""
    from strata.flows.export import ExportParams
    from strata.flows.export import export as export_flow

    hw = _size_option(with_preprocess, "--with-preprocess") if with_preprocess else None
    report = export_flow(
        ExportParams(
            learner=learner,
            version=_registered_version(learner, version, alias, workspace),
            alias=alias,
            fp16=fp16,
            opset=opset,
            out=str(out) if out else None,
            preprocess_hw=hw,
            triton=str(triton) if triton else None,
            weights=str(weights) if weights else None,
            workspace=str(workspace) if workspace else None,
        )
    )
    parity = report["parity"]
    console.print(
        f"exported v{report['version']} → {report['directory']} (max |Δ| {parity['max_abs_diff']:.2e}, "
        f"argmax agreement {parity['argmax_agreement']:.1%}, {parity['provider']})"
    )


@app.command()
def serve(
    learner: Annotated[str | None, typer.Option(help="serve this learner's alias (exported on first use)")] = None,
    alias: Annotated[str, typer.Option(help="registry alias to follow; the server reloads when it moves")] = "champion",
    model_dir: Annotated[
        Path | None, typer.Option(help="or: an export directory (or a symlink to one), reloaded when it changes")
    ] = None,
    host: Annotated[
        str, typer.Option(help="bind address; other than loopback needs STRATA_SERVE_API_KEY")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    poll_seconds: Annotated[float, typer.Option(min=0.1, help="how often to look for a new model version")] = 2.0,
    max_batch: Annotated[int, typer.Option(min=1, help="most images run together in one session.run")] = 32,
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace", "-w", help="workspace of --learner [default: the one containing the current directory]"
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP: POST /predict (images or a JSON tensor), GET /model, GET /health.

    Set STRATA_SERVE_API_KEY to require it from clients in the X-API-Key header.
    """
    from strata.tasks.serving.app import ServeConfig
    from strata.tasks.serving.server import serve as run_server
    from strata.tasks.serving.sources import ExportDirSource, ModelSource

    if (learner is None) == (model_dir is None):
        raise typer.BadParameter("give either --learner (and --alias) or --model-dir")
    source: ModelSource
    if learner is not None:
        from strata.flows.export import registry_source

        require_workspace(workspace)
        source = registry_source(learner, alias, str(workspace) if workspace else None)
    else:
        assert model_dir is not None  # exactly one of the two was given
        source = ExportDirSource(model_dir)
    config = ServeConfig(poll_seconds=poll_seconds, max_batch=max_batch, max_images=max_batch)
    run_server(source, host, port, config)
