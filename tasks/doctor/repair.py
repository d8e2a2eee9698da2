"""``strata doctor --repair``: rebuild what the surviving stores determine, delete nothing, report every step.

- The ledger: a missing or empty one becomes a fresh database at the head revision; then every row it lacks is
  filled in (``strata.tasks.ledger.rebuild``): data versions from the ingest commits and ``.dvc`` files on the
  branches, learners and their succeeded increments, classes and champion moves from MLflow's runs, registered
  versions and aliases. Rows it has are never changed.
- Checkpoints: an increment's missing checkpoint folder is downloaded from its run's ``state/`` artifacts.
- The DVC remote: a missing local remote, or one that lacks a version's files, is pushed to from the cache.

Registered versions, runs and aliases are only read: MLflow holds what cannot be rebuilt from anything else.
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from sqlalchemy import select

from strata.models.methods.registry import method_config
from strata.tasks.data.history import CACHE, IngestedVersion, class_counts, ingested_versions, missing_objects
from strata.tasks.data.versioning import dvc_repo
from strata.tasks.doctor.checks import local_remote, stale_exports
from strata.tasks.export.layout import PARTIAL, REPLACED, remove_stale
from strata.tasks.ledger import migrate
from strata.tasks.ledger.increments import ChampionMove, increments
from strata.tasks.ledger.rebuild import (
    RebuiltIncrement,
    RebuiltLearner,
    RebuiltVersion,
    fill_data_versions,
    fill_learner,
)
from strata.tasks.ledger.store import Increment, WorkspaceRow, find_learner, ledger_session
from strata.tasks.tracking import promotion, runs
from strata.tasks.tracking.history import TrackedIncrement, download_state, tracked_increments
from strata.tasks.workspace import identity
from strata.tasks.workspace.settings import StrataSettings

REPAIR_ACTOR = "repair"  # a promotion record's actor: the champion alias as repair found it


def repair(settings: StrataSettings) -> list[str]:
    """Repair the workspace's stores (see the module); returns one line per step taken."""
    steps = _ensure_ledger(settings)
    had_id = _ledger_id(settings)
    client = runs.configure(settings)  # checks the stores, and gives a new ledger the workspace's id
    if had_id is None:
        steps.append(f"ledger: recorded that it is workspace {identity.open_workspace(settings).id}'s")
    ingested = ingested_versions(settings.workspace)
    steps += _push_remote(settings, ingested)
    engine = migrate.migrated_engine(settings.ledger_url)
    try:
        with ledger_session(engine) as session:
            steps += fill_data_versions(session, [_rebuilt_version(settings, v) for v in ingested])
        names = {v.learner for v in ingested} | {
            m.name.removeprefix("strata-") for m in client.search_registered_models("name LIKE 'strata-%'")
        }
        for name in sorted(names):
            with ledger_session(engine) as session:
                learner = find_learner(session, name)
                present = {row.task_index for row in increments(session, learner)} if learner else set()
            rebuilt = _rebuilt_learner(settings, client, name, present)
            with ledger_session(engine) as session:
                steps += fill_learner(session, rebuilt)
        with ledger_session(engine) as session:
            rows = list(session.scalars(select(Increment).where(Increment.status == "succeeded")))
            steps += [step for row in rows if (step := _restore_checkpoint(settings, row))]
    finally:
        engine.dispose()
    return steps + _remove_stale_exports(settings)


def _remove_stale_exports(settings: StrataSettings) -> list[str]:
    """Remove what killed exports left, as the next export of that folder would (never a published export)."""
    steps = []
    for folder in stale_exports(settings):
        name = folder.name.split(PARTIAL)[0].split(REPLACED)[0]
        for removed in remove_stale(folder.with_name(name)):
            steps.append(f"export: removed {settings.relative(removed)}, left by an export that did not finish")
    return steps


def _ledger_id(settings: StrataSettings) -> str | None:
    with migrate.ledger(settings.ledger_url) as session:
        return session.scalar(select(WorkspaceRow.id))


def _ensure_ledger(settings: StrataSettings) -> list[str]:
    """A lost or empty SQLite ledger becomes a fresh one at head; a ledger behind head is upgraded (no row lost)."""
    current = migrate.current_revision(settings.ledger_url)  # a lost SQLite file is created here, empty
    if current == migrate.head_revision():
        return []
    migrate.upgrade(settings.ledger_url)
    was = "a new, empty ledger" if current is None else f"the ledger from revision {current}"
    return [f"ledger: migrated {was} to {migrate.head_revision()}"]


def _push_remote(settings: StrataSettings, ingested: list[IngestedVersion]) -> list[str]:
    """Push the cache to a local DVC remote that is missing or lacks some version's files."""
    remote = local_remote(settings)
    if remote is None or not ingested or all(missing_objects(remote, v.out) == 0 for v in ingested):
        return []
    remote.mkdir(parents=True, exist_ok=True)
    with dvc_repo(settings.workspace) as repo:
        pushed = repo.push()
    return [f"dvc: pushed {pushed} files from the cache to the remote {remote}"]


def _rebuilt_version(settings: StrataSettings, version: IngestedVersion) -> RebuiltVersion:
    roots = [settings.workspace / CACHE, *filter(None, [local_remote(settings)])]
    return RebuiltVersion(
        batch_id=version.batch_id,
        learner=version.learner,
        path=version.path,
        classes=class_counts(roots, version.out),
        md5=version.out.md5,
        hash_name=version.out.hash_name,
        git_rev=version.git_rev,
        remote=settings.dvc_remote,
    )


def _rebuilt_learner(settings: StrataSettings, client: MlflowClient, name: str, present: set[int]) -> RebuiltLearner:
    """The learner as MLflow recorded it: spec from its last state, increments, promotions from the gate's passes
    and the champion alias. The checkpoints of the tasks the ledger has (``present``) are not looked for: their
    rows are kept as they are."""
    tracked = tracked_increments(client, name, settings.mlflow_tracking_uri)
    if not tracked:
        return RebuiltLearner(name=name, method=None, backbone=None, method_config={})
    meta = tracked[-1].state_meta
    return RebuiltLearner(
        name=name,
        method=meta["method"],
        backbone=meta["backbone"]["name"],
        method_config=_overrides(method_config(meta["method"]).model_dump(mode="json"), meta["config"]),
        increments=[
            RebuiltIncrement(
                task_index=t.task_index,
                batch_id=t.batch_id,
                checkpoint_uri="" if t.task_index in present else _checkpoint(settings, name, t),
                metrics=t.metrics,
                run_id=t.run_id,
                model_version=t.version,
                class_names=list(t.state_meta["class_names"]),
            )
            for t in tracked
        ],
        promotions=_champion_moves(client, name, tracked),
    )


def _overrides(default: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """What of ``saved`` differs from the method's ``default`` config: the overrides the learner was given."""
    changed: dict[str, Any] = {}
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(default.get(key), dict):
            if inner := _overrides(default[key], value):
                changed[key] = inner
        elif default.get(key) != value:
            changed[key] = value
    return changed


def _champion_moves(client: MlflowClient, name: str, tracked: list[TrackedIncrement]) -> list[ChampionMove]:
    """Each gate pass (the run's ``gate.json``), then the alias where it now is if a later hand moved it."""
    moves: list[ChampionMove] = []
    champion: str | None = None
    for t in tracked:
        if t.promoted:
            reason = "; ".join(t.metrics["gate"]) + " (rebuilt from the run's gate.json)"
            moves.append(ChampionMove(version=t.version, previous=champion, actor="gate", reason=reason))
            champion = t.version
    alias = promotion.alias_version(client, runs.model_name(name), promotion.CHAMPION)
    if alias is not None and alias != champion:
        reason = "the champion alias as strata doctor --repair found it (promoted or rolled back by hand)"
        moves.append(ChampionMove(version=alias, previous=champion, actor=REPAIR_ACTOR, reason=reason))
    return moves


def _checkpoint(settings: StrataSettings, learner: str, tracked: TrackedIncrement) -> str:
    """The increment's checkpoint, relative to the workspace root: the learn flow's folder when it holds the run's
    state, else the run's state downloaded next to it (``state-v<version>``), never over a different one."""
    folder = settings.state_dir / "increments" / learner / f"task-{tracked.task_index:03d}"
    with tempfile.TemporaryDirectory(prefix="strata-state-") as scratch:
        state = download_state(tracked.run_id, Path(scratch), settings.mlflow_tracking_uri)
        for target in (folder / "state", folder / f"state-v{tracked.version}"):
            if not target.exists():
                shutil.copytree(state, target)
            if _same_files(state, target):
                return settings.relative(target)
    raise RuntimeError(f"{folder / f'state-v{tracked.version}'} holds another state than run {tracked.run_id}'s")


def _same_files(expected: Path, folder: Path) -> bool:
    names = sorted(p.name for p in expected.iterdir())
    return all((folder / n).is_file() and filecmp.cmp(expected / n, folder / n, shallow=False) for n in names)


def _restore_checkpoint(settings: StrataSettings, row: Increment) -> str | None:
    """Download a succeeded increment's missing checkpoint folder from its run."""
    folder = settings.resolve(row.checkpoint_uri or "")
    if folder.is_dir() and any(folder.iterdir()) or not row.mlflow_run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="strata-state-") as scratch:
        state = download_state(row.mlflow_run_id, Path(scratch), settings.mlflow_tracking_uri)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(state, folder, dirs_exist_ok=True)
    return f"checkpoint: restored {row.checkpoint_uri} from run {row.mlflow_run_id}'s state artifacts"
