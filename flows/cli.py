"""The ``strata`` command line: thin wrappers that call the flows and print their results."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from flows.demo import DemoError
from flows.profiles import UnknownProfileError
from models.backbones import TINY_BACKBONES, BackboneError
from models.engine import is_main_process
from models.methods import StateError, UnknownMethodError, available_methods, method_entry
from models.streams import StreamError
from tasks.data import DataVersionError
from tasks.datasets import DatasetError
from tasks.deployments import DeploymentError
from tasks.increments import LearnerConfigError
from tasks.ingest import IngestError
from tasks.ledger import LeaseHeldError, LedgerError
from tasks.model_source import ModelSourceError
from tasks.serving import ServeError
from tasks.settings import SettingsError, redact_url
from tasks.validate import BatchRejectedError
from tasks.versioning import VersioningError
from tasks.workspace import WorkspaceWriteError

app = typer.Typer(help="Strata: class-incremental learning on frozen pretrained ViTs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
USER_ERRORS = (UnknownProfileError, BackboneError, DatasetError, StreamError, UnknownMethodError, StateError,
               SettingsError, ValidationError, BatchRejectedError, IngestError, LedgerError, DataVersionError,
               VersioningError, ServeError, ModelSourceError, LearnerConfigError, LeaseHeldError, DemoError,
               DeploymentError, WorkspaceWriteError)
WorkspaceOption = Annotated[Path | None, typer.Option("--workspace", "-w", help="workspace root [default: the one "
                                                      "containing the current directory]")]
data_app = typer.Typer(help="Ingested data versions.", no_args_is_help=True)
db_app = typer.Typer(help="The ledger's schema (alembic migrations).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(db_app, name="db")


def user_errors(command):
    """Show a user's mistake as one clear line and exit 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from exc

    return wrapper


@app.command()
@user_errors
def benchmark(
    method: Annotated[str | None, typer.Option(help="method name (see `strata methods`) [default: simplecil]")] = None,
    dataset: Annotated[str | None, typer.Option(help="digits | cifar100:DIR | folder:DIR | synthetic[:N]")] = None,
    base: Annotated[int | None, typer.Option(help="classes in the first task (0: one increment)")] = None,
    increment: Annotated[int | None, typer.Option(help="classes per task [default: 2]")] = None,
    backbone: Annotated[str | None, typer.Option(help="tiny (random-init) or a timm ViT name")] = None,
    weights: Annotated[Path | None, typer.Option(help="local backbone weights (.safetensors/.pth/.npz)")] = None,
    class_order: Annotated[str | None, typer.Option(help="seeded (np seed permutation) | natural")] = None,
    seed: Annotated[int | None, typer.Option(help="class-order and training seed [default: 1993]")] = None,
    epochs: Annotated[int | None, typer.Option(help="override the method's epochs per task")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (default: cuda if available)")] = None,
    config: Annotated[str | None, typer.Option(help='config overrides as JSON: {"train": {"epochs": 2}}')] = None,
    profile: Annotated[str | None, typer.Option(help="settings of an official run (see `strata profiles`)")] = None,
    out: Annotated[Path, typer.Option(help="output folder for metrics.json and the plots")] = Path("runs/benchmark"),
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Run one method over a class-incremental stream; print A_t, Ā and forgetting per task."""
    from flows.benchmark import BenchmarkParams, run_benchmark
    from flows.profiles import profile_params

    given = dict(method=method, dataset=dataset, base=base, increment=increment, backbone=backbone,
                 weights=str(weights) if weights else None, class_order=class_order, seed=seed, epochs=epochs,
                 device=device)
    fields = profile_params(profile) if profile else {}
    fields.update({k: v for k, v in given.items() if v is not None})
    if config:
        fields["overrides"] = {**fields.get("overrides", {}), **_json_option(config)}
    params = BenchmarkParams(out=out, **fields)
    if params.backbone in TINY_BACKBONES and params.weights is None:
        console.print(f"[yellow]note:[/] backbone {params.backbone!r} is RANDOMLY INITIALISED (no pretrained "
                      "weights): these numbers show the pipeline working, not what a pretrained ViT would reach.")
    method, dataset, base, increment = params.method, params.dataset, params.base, params.increment
    table = Table(title=f"{method} on {dataset} B{base}-Inc{increment}")
    for column in ("task", "A_t", "Ā", "forgetting", "old", "new"):
        table.add_column(column, justify="right")

    def add_row(t: int, summary: dict) -> None:
        old = summary["old_accuracy"][t]
        table.add_row(str(t + 1), _pct(summary["accuracy"][t]), _pct(summary["average_incremental_accuracy"]),
                      _pct(summary["forgetting"][t]), "–" if old is None else _pct(old),
                      _pct(summary["new_accuracy"][t]))
        console.print(f"task {t + 1}: A_t {_pct(summary['accuracy'][t])}")

    metrics = run_benchmark(params, on_task=add_row, show_progress=not quiet)
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    console.print(table)
    console.print(f"final A {_pct(metrics['final_accuracy'])} · Ā {_pct(metrics['average_incremental_accuracy'])}"
                  f" · forgetting {_pct(metrics['final_forgetting'])} → {out}/metrics.json, "
                  f"{out}/accuracy_curve.png, {out}/accuracy_matrix.png")


@app.command()
@user_errors
def compare(
    methods: Annotated[str, typer.Option(help="comma-separated method names")] = "simplecil,finetune",
    dataset: Annotated[str, typer.Option(help="digits | cifar100:DIR | folder:DIR | synthetic[:N]")] = "digits",
    base: Annotated[int, typer.Option(help="classes in the first task (0: one increment)")] = 0,
    increment: Annotated[int, typer.Option(help="classes per task")] = 2,
    backbone: Annotated[str, typer.Option(help="tiny (random-init) or a timm ViT name")] = "tiny",
    weights: Annotated[Path | None, typer.Option(help="local backbone weights")] = None,
    seed: Annotated[int, typer.Option(help="class-order and training seed")] = 1993,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds to run every method with "
                                              "[default: --seed]")] = None,
    epochs: Annotated[int | None, typer.Option(help="override every method's epochs per task")] = None,
    dask_address: Annotated[str | None, typer.Option(help="fan the runs out over this Dask scheduler "
                                                     "(tcp://host:8786)")] = None,
    dask_workers: Annotated[int, typer.Option(min=0, help="or over a local Dask cluster of N worker processes "
                                              "[default: 0, one run at a time]")] = 0,
    out: Annotated[Path, typer.Option(help="output folder (METHOD/seed-SEED sub-folders)")] = Path("runs/compare"),
    workspace: WorkspaceOption = None,
) -> None:
    """The benchmark flow: methods × seeds on the same stream, one MLflow run each, a comparison table."""
    from flows.compare import CompareParams
    from flows.compare import compare as compare_flow

    rows = compare_flow(CompareParams(methods=[m.strip() for m in methods.split(",") if m.strip()], dataset=dataset,
                                      base=base, increment=increment, backbone=backbone,
                                      weights=str(weights) if weights else None, seed=seed,
                                      seeds=_int_list(seeds, "--seeds") if seeds else None,
                                      epochs=epochs, dask_address=dask_address, dask_workers=dask_workers, out=out,
                                      workspace=str(workspace) if workspace else None))
    table = Table(title=f"{dataset} B{base}-Inc{increment} on {backbone}")
    for column in rows[0]:
        table.add_column(column.replace("_", " "), justify="right", no_wrap=column == "method")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


@app.command()
def methods() -> None:
    """List the registered methods with what makes each different."""
    table = Table(title="methods")
    table.add_column("name")
    table.add_column("summary")
    for name in available_methods():
        table.add_row(name, method_entry(name).summary)
    console.print(table)


@app.command()
def profiles() -> None:
    """List the benchmark profiles that mirror the methods' official runs."""
    from flows.profiles import PROFILES

    table = Table(title="benchmark profiles (use with --profile NAME --dataset ... --weights ...)")
    for column in ("name", "method", "protocol", "backbone", "description"):
        table.add_column(column, no_wrap=column == "name")
    for name, p in sorted(PROFILES.items()):
        table.add_row(name, p["method"], f"B{p['base']}-Inc{p['increment']}", p["backbone"], p["description"])
    console.print(table)


@app.command()
@user_errors
def init(
    directory: Annotated[Path, typer.Argument(help="workspace folder (created if missing)")] = Path("."),
    remote: Annotated[str | None, typer.Option(help="DVC remote URL [default: .strata/dvc-remote]")] = None,
) -> None:
    """Make DIR a workspace: git, DVC with a default remote, strata.toml, the ledger at head. Idempotent."""
    from flows.data import init as init_workspace

    changes = init_workspace(directory, remote)
    for change in changes:
        console.print(f"[green]✓[/] {change}")
    if not changes:
        console.print(f"{directory.resolve()} is already a Strata workspace; nothing changed.")


@app.command()
@user_errors
def ingest(
    source: Annotated[Path, typer.Argument(help="ImageFolder tree (class/*.jpg or train/ + test/) or .zip/.tar(.gz)")],
    learner: Annotated[str, typer.Option(help="the learner this batch of new classes is for")],
    test_fraction: Annotated[float, typer.Option(min=0.01, max=0.99, help="test share when SRC has no split")] = 0.25,
    seed: Annotated[int, typer.Option(help="seed of that train/test split")] = 0,
    workspace: WorkspaceOption = None,
) -> None:
    """Validate a batch and record it as a DVC-versioned data version of LEARNER."""
    from flows.data import ingest_batch

    result = ingest_batch(source, learner, test_fraction, seed, workspace)
    verb = "ingested" if result.created else "already ingested (nothing changed):"
    console.print(f"{verb} {result.batch_id} for {result.learner}: {_class_counts(result.classes)} "
                  f"md5 {result.md5} git {result.git_rev[:10]}", highlight=False)


@data_app.command("list")
@user_errors
def data_list(learner: Annotated[str | None, typer.Option(help="only this learner's versions")] = None,
              workspace: WorkspaceOption = None) -> None:
    """The ingested data versions with their classes and counts."""
    from flows.data import data_versions

    table = Table(title="data versions")
    for column in ("batch", "learner", "classes (train/test)", "git", "created"):
        table.add_column(column, no_wrap=column != "classes (train/test)")
    for v in data_versions(learner, workspace):
        table.add_row(v["batch_id"], v["learner"], _class_counts(v["classes"]), v["git_rev"][:10], v["created"])
    console.print(table)


@data_app.command("show")
@user_errors
def data_show(batch: Annotated[str, typer.Argument(help="batch id (see `strata data list`)")],
              workspace: WorkspaceOption = None) -> None:
    """One data version in full, as JSON."""
    from flows.data import data_versions

    matches = [v for v in data_versions(None, workspace) if v["batch_id"] == batch]
    if not matches:
        raise IngestError(f"no data version {batch!r}; see `strata data list`")
    console.print_json(json.dumps(matches[0]))


@app.command()
@user_errors
def export(
    learner: Annotated[str, typer.Option(help="learner name")],
    version: Annotated[str | None, typer.Option(help="registered version [default: the alias's]")] = None,
    alias: Annotated[str, typer.Option(help="alias to export when no version is given")] = "champion",
    fp16: Annotated[bool, typer.Option(help="half-precision weights and compute (looser parity bound)")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    out: Annotated[Path | None, typer.Option(help="output folder [default: .strata/exports/<learner>/v<version>]")]
    = None,
    with_preprocess: Annotated[str | None, typer.Option(help="bake the test transform in for uint8 HxW images, "
                                                        "e.g. 256x256")] = None,
    triton: Annotated[Path | None, typer.Option(help="also write a Triton model repository here")] = None,
    weights: Annotated[Path | None, typer.Option(help="backbone weights file")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Export a registered version to ONNX (parity-gated) and log it on the version (onnx flavor)."""
    from flows.export import ExportParams
    from flows.export import export as export_flow

    hw = tuple(int(v) for v in with_preprocess.lower().split("x")) if with_preprocess else None
    report = export_flow(ExportParams(learner=learner, version=version, alias=alias, fp16=fp16, opset=opset,
                                      out=str(out) if out else None, preprocess_hw=hw,
                                      triton=str(triton) if triton else None, weights=str(weights) if weights else None,
                                      workspace=str(workspace) if workspace else None))
    parity = report["parity"]
    console.print(f"exported v{report['version']} → {report['directory']} (max |Δ| {parity['max_abs_diff']:.2e}, "
                  f"argmax agreement {parity['argmax_agreement']:.1%}, {parity['provider']})")


@app.command()
@user_errors
def serve(
    learner: Annotated[str | None, typer.Option(help="serve this learner's alias (exported on first use)")] = None,
    alias: Annotated[str, typer.Option(help="registry alias to follow; the server reloads when it moves")]
    = "champion",
    model_dir: Annotated[Path | None, typer.Option(help="or: an export directory (or a symlink to one), "
                                                   "reloaded when it changes")] = None,
    host: Annotated[str, typer.Option(help="bind address; other than loopback needs STRATA_SERVE_API_KEY")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    poll_seconds: Annotated[float, typer.Option(min=0.1, help="how often to look for a new model version")] = 2.0,
    max_batch: Annotated[int, typer.Option(min=1, help="most images run together in one session.run")] = 32,
    workspace: WorkspaceOption = None,
) -> None:
    """Serve a model over HTTP: POST /predict (images or a JSON tensor), GET /model, GET /health.

    Set STRATA_SERVE_API_KEY to require it from clients in the X-API-Key header.
    """
    from flows.serve import serve as run_server
    from tasks.model_source import ExportDirSource
    from tasks.serving import ServeConfig

    if (learner is None) == (model_dir is None):
        raise typer.BadParameter("give either --learner (and --alias) or --model-dir")
    if learner is not None:
        from flows.export import registry_source

        source = registry_source(learner, alias, str(workspace) if workspace else None)
    else:
        source = ExportDirSource(model_dir)
    config = ServeConfig(poll_seconds=poll_seconds, max_batch=max_batch, max_images=max_batch)
    run_server(source, host, port, config)


@db_app.command("upgrade")
@user_errors
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head", workspace: WorkspaceOption = None) -> None:
    """Migrate the ledger up to REVISION."""
    from flows.data import db_upgrade as upgrade

    console.print(f"ledger at revision {upgrade(revision, workspace)}")


@db_app.command("downgrade")
@user_errors
def db_downgrade(revision: Annotated[str, typer.Argument()] = "-1", workspace: WorkspaceOption = None) -> None:
    """Migrate the ledger down to REVISION (default: one step; `base` drops every table)."""
    from flows.data import db_downgrade as downgrade

    console.print(f"ledger at revision {downgrade(revision, workspace)}")


@db_app.command("current")
@user_errors
def db_current(workspace: WorkspaceOption = None) -> None:
    """The ledger's revision and the head revision."""
    from flows.data import db_current as current

    revision, head = current(workspace)
    hint = "" if revision == head else " — run `strata db upgrade`"
    console.print(f"ledger at revision {revision} (head {head}){hint}")


@app.command()
@user_errors
def learn(
    learner: Annotated[str, typer.Option(help="learner name (created on first use)")],
    method: Annotated[str | None, typer.Option(help="method on first learn [default: simplecil]")] = None,
    backbone: Annotated[str | None, typer.Option(help="backbone on first learn [default: tiny]")] = None,
    weights: Annotated[Path | None, typer.Option(help="local backbone weights file")] = None,
    config: Annotated[str | None, typer.Option(help="method-config overrides as JSON (first learn)")] = None,
    budget: Annotated[float, typer.Option(help="allowed drop on the champion's classes (0.05 = 5 points)")] = 0.05,
    floor: Annotated[float, typer.Option(help="minimum A_t for a champion")] = 0.0,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda … [default: cuda if available]")] = None,
    processes: Annotated[int, typer.Option(min=1, help="data-parallel training processes per increment (one per "
                                           "GPU; gloo on CPU)")] = 1,
    workspace: WorkspaceOption = None,
) -> None:
    """Learn every data version the learner has not learned yet (one increment each)."""
    from flows.learn import LearnParams
    from flows.learn import learn as learn_flow
    from tasks.registry import GateConfig

    result = learn_flow(LearnParams(
        learner=learner, method=method, backbone=backbone, weights=str(weights) if weights else None,
        config=_json_option(config), gate=GateConfig(old_accuracy_budget=budget, accuracy_floor=floor), seed=seed,
        device=device, processes=processes, workspace=str(workspace) if workspace else None))
    if not result["learned"]:
        console.print(f"learner {learner!r} has nothing new to learn ({result['tasks']} tasks learned)")
    for item in result["learned"]:
        verdict = "promoted to champion" if item["promoted"] else "not promoted"
        console.print(f"learned {item['batch_id']}: A_t {_pct(item['accuracy'])}, {verdict}")


LearnersOption = Annotated[list[str] | None, typer.Option("--learner", help="a learner to deploy learn for "
                                                         "(repeatable) [default: every learner of the workspace]")]
PrefectFileOption = Annotated[Path | None, typer.Option(help="deployments file [default: the workspace's "
                                                        "prefect.yaml, else Strata's own]")]
GpuSlotsOption = Annotated[int | None, typer.Option(min=1, help="slots of the `gpu` concurrency limit: training "
                                                    "processes at once [default: keep it, or 1 when missing]")]


@app.command()
@user_errors
def deploy(learner: LearnersOption = None,
           pool: Annotated[str | None, typer.Option(help="work pool for every deployment [default: the one "
                                                    "prefect.yaml names, `strata`; created if missing]")] = None,
           gpu_slots: GpuSlotsOption = None, prefect_file: PrefectFileOption = None,
           workspace: WorkspaceOption = None) -> None:
    """Create or update the prefect.yaml deployments on the Prefect API (PREFECT_API_URL).

    learn/<learner> runs nightly and on every `strata.batch.ingested` event for that learner, one run at a
    time per learner; benchmark/manual and export/manual run from the UI. Then start `strata worker`.
    """
    from flows.deploy import deploy as deploy_all

    for name in deploy_all(learner, pool, gpu_slots, workspace, prefect_file):
        console.print(f"[green]✓[/] deployment {name}")
    console.print("run them with: strata worker   (or: prefect worker start --pool strata)")


@app.command()
@user_errors
def worker(pool: Annotated[str, typer.Option(help="work pool to take runs from")] = "strata",
           limit: Annotated[int | None, typer.Option(help="most flow runs at once")] = None) -> None:
    """Run Prefect's process worker on the pool (`prefect worker start --pool NAME --type process`)."""
    from flows.deploy import worker as start_worker

    start_worker(pool, limit)


@app.command("serve-flows")
@user_errors
def serve_flows(learner: LearnersOption = None, gpu_slots: GpuSlotsOption = None,
                limit: Annotated[int | None, typer.Option(help="most flow runs at once")] = None,
                prefect_file: PrefectFileOption = None, workspace: WorkspaceOption = None) -> None:
    """Serve the prefect.yaml deployments from this one process: schedules and triggers, no work pool."""
    from flows.deploy import serve_flows as serve_all

    serve_all(learner, gpu_slots, workspace, prefect_file, limit)


@app.command()
@user_errors
def status(learner: Annotated[str | None, typer.Option(help="only this learner")] = None,
           workspace: WorkspaceOption = None) -> None:
    """Learners, their increments (A_t, Ā, version), classes and champion."""
    from flows.manage import status as learner_status

    for item in learner_status(learner, workspace):
        console.print(_increments_table(item))


@app.command()
@user_errors
def promote(learner: Annotated[str, typer.Option(help="learner name")],
            version: Annotated[str, typer.Option(help="registered model version to make champion")],
            workspace: WorkspaceOption = None) -> None:
    """Move the learner's champion alias to VERSION by hand (recorded in the ledger)."""
    from flows.manage import promote as promote_version

    previous = promote_version(learner, version, workspace)
    console.print(f"champion of {learner}: v{previous} → v{version}")


@app.command()
@user_errors
def rollback(learner: Annotated[str, typer.Option(help="learner name")], workspace: WorkspaceOption = None) -> None:
    """Move the champion back to the version it pointed at before its last move."""
    from flows.manage import rollback as rollback_champion

    console.print(f"champion of {learner} rolled back to v{rollback_champion(learner, workspace)}")


@app.command()
@user_errors
def demo(method: Annotated[str, typer.Option(help="method the digits learner uses")] = "simplecil",
         directory: Annotated[Path | None, typer.Option("--dir", help="fresh workspace folder [default: a new "
                                                        "temporary folder]")] = None) -> None:
    """Ingest and learn scikit-learn's digits in 5 batches, end to end, offline."""
    from rich.progress import Progress

    from flows.demo import run_demo

    console.print("[yellow]note:[/] the demo uses the [bold]tiny RANDOMLY INITIALISED[/] ViT: it shows the platform "
                  "working, not what a pretrained backbone reaches (pass real weights to `strata learn` for that).")
    with Progress(console=console) as progress:
        bar = progress.add_task("ingest + learn", total=5)

        def advance(index: int, total: int, name: str) -> None:
            progress.update(bar, completed=index, total=total, description=f"ingest + learn {name}")

        result = run_demo(directory, method, advance)
        progress.update(bar, completed=5)
    item, settings = result["status"], result["settings"]
    console.print(_increments_table(item))
    console.print(f"champion: v{item['champion']} · workspace {result['workspace']} · {result['seconds']:.0f} s")
    console.print(f"MLflow UI:  mlflow ui --backend-store-uri {redact_url(settings.mlflow_tracking_uri)} "
                  f"--default-artifact-root {settings.mlflow_artifacts} --host 127.0.0.1")
    console.print("Prefect UI: prefect server start --host 127.0.0.1   (then open http://127.0.0.1:4200)")


def _increments_table(item: dict) -> Table:
    table = Table(title=f"{item['learner']} ({item['method']} on {item['backbone']}) · champion v{item['champion']}")
    for column in ("task", "status", "version", "A_t", "Ā", "promoted"):
        table.add_column(column, justify="right")
    for inc in item["increments"]:
        table.add_row(str(inc["task"]), inc["status"], str(inc["version"] or "–"),
                      _pct(inc["accuracy"]) if inc["accuracy"] is not None else "–",
                      _pct(inc["average_incremental_accuracy"]) if inc["average_incremental_accuracy"] is not None
                      else "–", {True: "yes", False: "no"}.get(inc["promoted"], "–"))
    return table


def _class_counts(classes: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{name} {c['train']}/{c['test']}" for name, c in classes.items())


def _json_option(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--config is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise typer.BadParameter("--config must be a JSON object")
    return value


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"{option} takes comma-separated integers, not {text!r}") from exc


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


if __name__ == "__main__":
    app()
