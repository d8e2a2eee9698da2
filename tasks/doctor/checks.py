"""``strata doctor``: the links between a workspace's stores, checked one by one, each broken link one finding.

A data version is a ledger row ↔ its ingest commit on a branch ↔ the ``.dvc`` file's md5 there ↔ the DVC
objects in the cache or on the remote. An increment is a ledger row ↔ its MLflow run (tags naming the same
learner, task and data) ↔ its registered version (of that run) ↔ the aliases (``champion`` and ``candidate`` on
versions the ledger recorded; the last promotion record names the champion) ↔ its checkpoint folder; an export
folder is a complete export of a registered version. Nothing here writes: ``repair`` does, from what survives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from sqlalchemy.orm import Session

from strata.models.methods.base import STATE_META
from strata.tasks.data.history import CACHE, dvc_out_at, ingested_versions, missing_objects, on_a_branch
from strata.tasks.data.versioning import DvcOut
from strata.tasks.export.layout import PARTIAL, REPLACED, manifest_problem
from strata.tasks.ledger import migrate
from strata.tasks.ledger.increments import increments, learners, promotions
from strata.tasks.ledger.store import DataVersion, Increment, Learner, ledger_session, list_data_versions
from strata.tasks.tracking import promotion, runs
from strata.tasks.workspace import identity
from strata.tasks.workspace.settings import StrataSettings

REPAIR = "run `strata doctor --repair`"


@dataclass(frozen=True)
class Finding:
    """One broken link: in which store, about what, what is wrong, and what fixes it."""

    store: str
    subject: str
    problem: str
    fix: str = ""  # empty when the problem's own words say it (a store check's message)

    def __str__(self) -> str:
        return f"{self.store}: {self.subject}: {self.problem}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Checked:
    """What ``diagnose`` looked at, for the healthy line."""

    data_versions: int
    increments: int


def diagnose(settings: StrataSettings) -> list[Finding]:
    """Every broken link between the workspace's stores; ``[]`` for a healthy workspace."""
    return check(settings)[0]


def check(settings: StrataSettings) -> tuple[list[Finding], Checked]:
    """``diagnose``, with how many data versions and increments it checked."""
    findings = _ledger_findings(settings)
    if findings:  # without its ledger nothing else can be compared
        return findings, Checked(0, 0)
    engine = migrate.migrated_engine(settings.ledger_url)
    try:
        with ledger_session(engine) as session:
            versions = list_data_versions(session)
            findings += list(_data_findings(settings, versions))
            everyone = learners(session)
            rows = {learner.name: increments(session, learner) for learner in everyone}
            count = Checked(len(versions), sum(len(learned) for learned in rows.values()))
            lost = _mlflow_store_lost(
                settings, any(r.status == "succeeded" for learned in rows.values() for r in learned)
            )
            if lost is not None or not _mlflow_store_exists(settings):  # a workspace that never learned has none
                return findings + ([lost] if lost else []), count
            try:  # any other damage open_workspace refuses: unreadable, not SQLite, another workspace's
                identity.check_stores(settings)
            except identity.StoreError as exc:
                return findings + [Finding("stores", settings.relative(settings.state_dir), str(exc))], count
            client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)  # read, never settle
            for learner in everyone:
                findings += list(_learner_findings(settings, client, session, learner, rows[learner.name]))
            findings += list(_unknown_learners(client, set(rows)))
            findings += list(_export_findings(settings, client))
    finally:
        engine.dispose()
    return findings, count


def _ledger_findings(settings: StrataSettings) -> list[Finding]:
    """The ledger must be there, non-empty and at the head revision. Checked without opening a missing SQLite
    file: opening it would create the empty store this looks for."""
    ledger = identity.sqlite_file(settings.ledger_url)
    if ledger is not None and (not ledger.is_file() or ledger.stat().st_size == 0):
        state = "is missing" if not ledger.is_file() else "is empty (0 bytes)"
        fix = f"{REPAIR} to rebuild it from git, DVC and MLflow (never `strata init`: it would start a new ledger)"
        return [Finding("ledger", settings.relative(ledger), f"the ledger database {state}", fix)]
    current, head = migrate.current_revision(settings.ledger_url), migrate.head_revision()
    if current is None:
        return [Finding("ledger", settings.ledger_url, "the ledger has no schema (no tables)", REPAIR)]
    if current != head:
        return [Finding("ledger", settings.ledger_url, f"at revision {current}, not {head}", "run `strata db upgrade`")]
    return []


def _mlflow_store_exists(settings: StrataSettings) -> bool:
    file = identity.sqlite_file(settings.mlflow_tracking_uri)
    return file is None or file.is_file()


def _mlflow_store_lost(settings: StrataSettings, learned: bool) -> Finding | None:
    """An empty SQLite MLflow store, or a missing one when the ledger recorded increments in it."""
    file = identity.sqlite_file(settings.mlflow_tracking_uri)
    if file is None or (file.is_file() and file.stat().st_size > 0) or (not file.is_file() and not learned):
        return None
    state = "is missing" if not file.is_file() else "is empty (0 bytes)"
    return Finding(
        "mlflow",
        settings.relative(file),
        f"the MLflow store {state}: every run, registered version and alias is in it",
        "restore it from a backup; Strata cannot rebuild registered models",
    )


def local_remote(settings: StrataSettings) -> Path | None:
    """The DVC remote as a local folder (None for a cloud remote, which this does not list)."""
    url = settings.dvc_remote
    if "://" in url and not url.startswith("file://"):
        return None
    path = Path(url.removeprefix("file://"))
    return path if path.is_absolute() else settings.workspace / path


def _data_findings(settings: StrataSettings, versions: list[DataVersion]) -> Iterator[Finding]:
    workspace = settings.workspace
    remote = local_remote(settings)
    remote_lost = remote is not None and not remote.is_dir()
    if remote is not None and remote_lost:
        shown = settings.relative(remote)
        yield Finding("dvc", f"remote {shown}", "the DVC remote folder is missing", f"{REPAIR} to push the cache")
    cache = workspace / CACHE
    for version in versions:
        subject = f"data version {version.batch_id}"
        out = DvcOut(version.md5, version.hash_name)
        if not on_a_branch(workspace, version.git_rev):
            yield Finding(
                "git",
                subject,
                f"its commit {version.git_rev[:12]} is on no branch (or gone)",
                "restore the branch holding it (git reflog), or merge that commit",
            )
            continue
        at_commit = dvc_out_at(workspace, version.git_rev, version.path)
        if at_commit != out:
            held = f"md5 {at_commit.md5}" if at_commit else "no such file"
            yield Finding(
                "git",
                subject,
                f"{version.path}.dvc at {version.git_rev[:12]} holds {held}, the ledger {version.md5}",
                "restore the .dvc file from the commit the ledger names",
            )
            continue
        in_cache = missing_objects(cache, out) == 0
        on_remote = remote is None or remote_lost or missing_objects(remote, out) == 0
        if not in_cache and not on_remote:
            yield Finding("dvc", subject, "neither the DVC cache nor the remote holds all its files", "ingest it again")
        elif not on_remote:
            yield Finding("dvc", subject, f"the DVC remote {remote} lacks some of its files", f"{REPAIR} to push them")
    known = {version.batch_id for version in versions}
    for ingested in ingested_versions(workspace):
        if ingested.batch_id not in known:
            yield Finding(
                "ledger",
                f"data version {ingested.batch_id}",
                f"commit {ingested.git_rev[:12]} ingested it for learner {ingested.learner}; the ledger has no row",
                f"{REPAIR} (or ingest the batch again)",
            )


def registered_versions(client: MlflowClient, learner: str) -> dict[str, ModelVersion]:
    try:
        return {str(v.version): v for v in client.search_model_versions(f"name = '{runs.model_name(learner)}'")}
    except MlflowException:
        return {}


def _aliases(client: MlflowClient, learner: str) -> dict[str, str]:
    try:
        return {alias: str(v) for alias, v in client.get_registered_model(runs.model_name(learner)).aliases.items()}
    except MlflowException:
        return {}


def _learner_findings(
    settings: StrataSettings, client: MlflowClient, session: Session, learner: Learner, learned: list[Increment]
) -> Iterator[Finding]:
    name = runs.model_name(learner.name)
    versions = registered_versions(client, learner.name)
    recorded: set[str] = set()
    attempts = {row.attempt_run_id for row in learned if row.status != "succeeded" and row.attempt_run_id}
    for row in learned:
        if row.status != "succeeded":
            continue
        subject = f"learner {learner.name} task {row.task_index}"
        recorded.add(str(row.model_version))
        yield from _run_findings(client, subject, learner, row, session.get(DataVersion, row.data_version_id))
        version = versions.get(str(row.model_version))
        if version is None:
            yield Finding(
                "registry",
                subject,
                f"{name} has no version {row.model_version}, which the ledger recorded",
                "restore the MLflow store from a backup; Strata never deletes a recorded version",
            )
        elif version.run_id != row.mlflow_run_id:
            yield Finding(
                "registry",
                subject,
                f"{name} v{row.model_version} is of run {version.run_id}, not {row.mlflow_run_id}",
                "restore the MLflow store from a backup",
            )
        folder = settings.resolve(row.checkpoint_uri or "")
        if not (folder / STATE_META).is_file():
            yield Finding(
                "checkpoint",
                subject,
                f"checkpoint {row.checkpoint_uri} is missing",
                f"{REPAIR} to restore it from run {row.mlflow_run_id}'s artifacts",
            )
    for number, version in sorted(versions.items(), key=lambda item: int(item[0])):
        if number in recorded:
            continue
        if version.run_id in attempts:
            problem, fix = "registered by an interrupted attempt", "the next `strata learn` removes it"
        else:
            problem = "registered but not recorded in the ledger"
            fix = f"compare it with `strata status --learner {learner.name}`; Strata never deletes it (MLflow can)"
        yield Finding("registry", f"{name} v{number}", problem, fix)
    aliases = _aliases(client, learner.name)
    unrecorded = [
        alias for alias in (promotion.CHAMPION, promotion.CANDIDATE) if aliases.get(alias, "") not in {"", *recorded}
    ]
    for alias in unrecorded:
        yield Finding(
            "registry",
            f"{name}@{alias}",
            f"points at v{aliases[alias]}, which the ledger did not record",
            f"`strata promote` a recorded version (see `strata status --learner {learner.name}`)",
        )
    moves = promotions(session, learner)
    last = moves[-1].model_version if moves else None
    if promotion.CHAMPION not in unrecorded and last != aliases.get(promotion.CHAMPION):
        yield Finding(
            "ledger",
            f"{name}@{promotion.CHAMPION}",
            f"the last promotion record names v{last}, the alias v{aliases.get(promotion.CHAMPION)}",
            f"`strata promote` the version that should serve, or {REPAIR}",
        )


def _run_findings(
    client: MlflowClient, subject: str, learner: Learner, row: Increment, data: DataVersion | None
) -> Iterator[Finding]:
    try:
        run = client.get_run(str(row.mlflow_run_id))
    except MlflowException:
        yield Finding("mlflow", subject, f"its run {row.mlflow_run_id} is missing", "restore the MLflow store")
        return
    expected = {
        "strata.learner": learner.name,
        "strata.task_index": str(row.task_index),
        "strata.batch_id": data.batch_id if data else "",
        "strata.dvc_md5": data.md5 if data else "",
    }
    wrong = sorted(key for key, value in expected.items() if run.data.tags.get(key) != value)
    if wrong:
        shown = ", ".join(f"{key}={run.data.tags.get(key)!r} (ledger {expected[key]!r})" for key in wrong)
        yield Finding("mlflow", subject, f"run {row.mlflow_run_id} has {shown}", "restore the MLflow store")


def _unknown_learners(client: MlflowClient, known: set[str]) -> Iterator[Finding]:
    """Registered models ``strata-<learner>`` of a learner the ledger does not have (a lost or replaced ledger)."""
    for model in client.search_registered_models("name LIKE 'strata-%'"):
        learner = model.name.removeprefix("strata-")
        if learner not in known:
            yield Finding(
                "ledger", f"learner {learner}", f"{model.name} is registered; the ledger has no learner", REPAIR
            )


def _export_findings(settings: StrataSettings, client: MlflowClient) -> Iterator[Finding]:
    """Every folder under ``.strata/exports/<learner>/`` is ``v<version>`` of a registered version, complete (its
    manifest proves it: ``strata.tasks.export.layout``); a killed export's ``.partial-*`` or ``.replaced-*``
    folder is reported for ``--repair`` to remove."""
    root = settings.state_dir / "exports"
    for folder in sorted(root.glob("*/*")) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        learner, subject = folder.parent.name, settings.relative(folder)
        number = folder.name.removeprefix("v")
        if PARTIAL in folder.name or REPLACED in folder.name:
            yield Finding("export", subject, "left by an export that did not finish", f"{REPAIR} to remove it")
        elif not folder.name.startswith("v") or not number.isdigit():
            yield Finding("export", subject, "not an export folder (v<version>)", f"move {folder} out of .strata/")
        elif number not in registered_versions(client, learner):
            yield Finding("export", subject, f"{runs.model_name(learner)} has no version {number}", f"delete {folder}")
        elif problem := manifest_problem(folder):
            yield Finding(
                "export",
                subject,
                f"incomplete: {problem}",
                f"`strata export --learner {learner} --version {number}` writes it again",
            )


def stale_exports(settings: StrataSettings) -> list[Path]:
    """The export folders killed exports left (what ``remove_stale`` of the layout removes)."""
    root = settings.state_dir / "exports"
    return [f for f in sorted(root.glob("*/*")) if PARTIAL in f.name or REPLACED in f.name] if root.is_dir() else []
