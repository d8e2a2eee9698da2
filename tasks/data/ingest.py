"""Ingest one batch of labelled images as an immutable, versioned data version.

Order: validate all → copy → ``dvc add`` → git commit of the ``.dvc`` file → ``dvc push`` → ledger row.
The ledger row is written last, so a crash at any step leaves no version at all; every step is
idempotent, so ingesting the same batch again completes whatever the crash left undone. A full or
read-only disk is one ``WorkspaceWriteError`` naming the path and the fix, and what a refused
``dvc add`` left behind is taken back, so ``git status`` stays clean.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from strata.models.errors import UserError
from strata.tasks.data.commits import CommitRefusedError, GitStateError, check_git_state
from strata.tasks.data.validate import BatchPlan, Limits, class_key, plan_batch, unpacked
from strata.tasks.data.versioning import commit_paths, dvc_add, dvc_file, dvc_lock, dvc_push, git
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.ledger.store import (
    DataVersion,
    check_learner_name,
    find_data_version,
    find_learner,
    get_or_create_learner,
    known_classes,
    ledger_session,
)
from strata.tasks.workspace.settings import StrataSettings
from strata.tasks.workspace.writes import refused_write, workspace_writes

BATCHES = Path("data") / "batches"
EVENT = "strata.batch.ingested"
log = logging.getLogger(__name__)


class IngestError(UserError, ValueError):
    """The batch is valid but cannot be ingested for this learner; the message says why."""


@dataclass(frozen=True)
class IngestResult:
    batch_id: str
    learner: str
    md5: str
    git_rev: str
    classes: dict[str, dict[str, int]]
    created: bool  # False: identical content was already ingested, nothing changed


def ingest(
    settings: StrataSettings,
    source: Path,
    learner: str,
    test_fraction: float = 0.25,
    seed: int = 0,
    limits: Limits = Limits(),
) -> IngestResult:
    """Validate ``source`` and make it the learner's next data version (or report the existing one)."""
    check_learner_name(learner)
    check_git_state(settings.workspace)  # a detached HEAD or a merge in progress: refused before any write
    engine = migrated_engine(settings.ledger_url)
    try:
        with workspace_writes("ingest"), unpacked(source, limits) as root:
            plan = plan_batch(root, test_fraction, seed, limits, label=source)
            with dvc_lock(settings.workspace):  # also serialises ledger check and record per workspace
                existing = _check_against_ledger(engine, plan, learner)
                if existing is not None:
                    return existing
                target = settings.workspace / BATCHES / plan.batch_id
                if not _matches(plan, target):
                    _copy(plan, target)
                try:
                    out = dvc_add(settings.workspace, target)
                    rev = commit_paths(
                        settings.workspace,
                        [dvc_file(target)],
                        f"strata: ingest {plan.batch_id} for learner {learner}",
                        lines={target.parent / ".gitignore": [_ignore_line(target)]},
                    )
                except Exception as exc:
                    if refused_write(exc) is not None or isinstance(exc, (CommitRefusedError, GitStateError)):
                        _remove_uncommitted(settings.workspace, target)
                    raise
                dvc_push(settings.workspace, target)
                result = _record(engine, settings, plan, learner, target, out.md5, out.hash_name, rev)
    finally:
        engine.dispose()
    emit_ingested(result)
    return result


def _check_against_ledger(engine: Engine, plan: BatchPlan, learner: str) -> IngestResult | None:
    with ledger_session(engine) as session:
        version = find_data_version(session, plan.batch_id)
        if version is not None:
            if version.learner.name != learner:
                raise IngestError(f"{plan.batch_id} was already ingested for learner {version.learner.name!r}")
            return _result(version, created=False)
        row = find_learner(session, learner)
        clash = sorted(known_classes(session, row) & set(plan.classes)) if row else []
        if clash:
            raise IngestError(
                f"learner {learner!r} already knows classes {clash}; a batch may only bring new "
                f"classes (class-incremental)"
            )
        known = {class_key(name): name for name in (known_classes(session, row) if row else ())}
        lookalikes = [(known[class_key(name)], name) for name in plan.classes if class_key(name) in known]
        if lookalikes:
            old, new = lookalikes[0]
            raise IngestError(
                f"the batch's class {ascii(new)} differs from class {ascii(old)}, which learner {learner!r} already "
                f"knows, only by case, Unicode normalisation or surrounding spaces; give it a distinct name"
            )
    return None


def _matches(plan: BatchPlan, target: Path) -> bool:
    """True if ``target`` holds exactly the planned files (an earlier copy that completed)."""
    if not target.is_dir():
        return False
    present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    return present == {f.destination for f in plan.files}


def _copy(plan: BatchPlan, target: Path) -> None:
    """Copy through a sibling staging folder and one rename, so ``target`` is complete or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in [target, *target.parent.glob(f".{target.name}.*")]:
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for f in plan.files:
            destination = staging / f.destination
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.source, destination)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_uncommitted(workspace: Path, target: Path) -> None:
    """Take back a copy that could not be committed (full or read-only disk, a commit hook that refused it),
    unless a commit holds it.

    The copy, its ``.dvc`` file and DVC's ``.gitignore`` line would leave ``git status`` dirty and a
    version half recorded, and on a full disk the copy takes up the very space the user is asked to
    free; the batch's source is still there to ingest again. Only DVC's line leaves the ``.gitignore``:
    the user's own edits of that file stay.
    """
    if git(workspace, "ls-files", "--", dvc_file(target).relative_to(workspace).as_posix()):
        return
    shutil.rmtree(target, ignore_errors=True)
    dvc_file(target).unlink(missing_ok=True)
    gitignore = target.parent / ".gitignore"
    if not gitignore.is_file():
        return
    kept = [line for line in gitignore.read_text().splitlines() if line != _ignore_line(target)]
    if kept or git(workspace, "ls-files", "--", gitignore.relative_to(workspace).as_posix()):
        gitignore.write_text("".join(f"{line}\n" for line in kept))
    else:
        gitignore.unlink()


def _ignore_line(target: Path) -> str:
    """The line ``dvc add`` writes into the ``.gitignore`` next to ``target``."""
    return f"/{target.name}"


def _record(
    engine: Engine,
    settings: StrataSettings,
    plan: BatchPlan,
    learner: str,
    target: Path,
    md5: str,
    hash_name: str,
    rev: str,
) -> IngestResult:
    with ledger_session(engine) as session:
        version = DataVersion(
            batch_id=plan.batch_id,
            learner=get_or_create_learner(session, learner),
            path=target.relative_to(settings.workspace).as_posix(),
            classes=plan.classes,
            split=plan.split,
            md5=md5,
            hash_name=hash_name,
            git_rev=rev,
            remote=settings.relative(settings.dvc_remote),  # relative inside the workspace: relocatable
        )
        session.add(version)
        session.flush()
        return _result(version, created=True)


def _result(version: DataVersion, created: bool) -> IngestResult:
    return IngestResult(version.batch_id, version.learner.name, version.md5, version.git_rev, version.classes, created)


def emit_ingested(result: IngestResult) -> None:
    """Tell Prefect (triggers start learning on it), when a Prefect API is configured.

    Without ``PREFECT_API_URL`` Prefect would start an ephemeral server just to receive the event
    (about 10 s) and it would vanish with this process, so no trigger could ever see it: skip.
    Delivery is best effort either way; the ledger row is the record.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        log.info("no Prefect API configured (PREFECT_API_URL): event %s not sent", EVENT)
        return
    from prefect.events import emit_event

    emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"strata.batch.{result.batch_id}"},
        related=[{"prefect.resource.id": f"strata.learner.{result.learner}", "prefect.resource.role": "learner"}],
        payload={
            "learner": result.learner,
            "batch_id": result.batch_id,
            "md5": result.md5,
            "classes": sorted(result.classes),
        },
    )
