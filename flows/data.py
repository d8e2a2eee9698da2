"""Workspace and data flows behind ``strata init``, ``strata ingest``, ``strata data`` and ``strata db``."""

from __future__ import annotations

from pathlib import Path

from tasks import migrate
from tasks.ingest import IngestResult, ingest
from tasks.ledger import list_data_versions
from tasks.settings import StrataSettings, load_settings
from tasks.workspace import find_workspace, init_workspace


def workspace_settings(workspace: Path | None) -> StrataSettings:
    """Settings of ``workspace``, or of the workspace that contains the current directory."""
    return load_settings(workspace or find_workspace())


def init(directory: Path, remote: str | None = None) -> list[str]:
    return init_workspace(directory, remote)


def ingest_batch(source: Path, learner: str, test_fraction: float, seed: int,
                 workspace: Path | None = None) -> IngestResult:
    return ingest(workspace_settings(workspace), source, learner, test_fraction, seed)


def data_versions(learner: str | None = None, workspace: Path | None = None) -> list[dict]:
    """The ledger's data versions as plain rows (oldest first)."""
    settings = workspace_settings(workspace)
    with migrate.ledger(settings.ledger_url) as session:
        return [dict(batch_id=v.batch_id, learner=v.learner.name, classes=v.classes, split=v.split,
                     md5=v.md5, hash_name=v.hash_name, git_rev=v.git_rev, remote=v.remote, path=v.path,
                     created=v.created.isoformat(timespec="seconds"))
                for v in list_data_versions(session, learner)]


def db_upgrade(revision: str, workspace: Path | None = None) -> str | None:
    url = workspace_settings(workspace).ledger_url
    migrate.upgrade(url, revision)
    return migrate.current_revision(url)


def db_downgrade(revision: str, workspace: Path | None = None) -> str | None:
    url = workspace_settings(workspace).ledger_url
    migrate.downgrade(url, revision)
    return migrate.current_revision(url)


def db_current(workspace: Path | None = None) -> tuple[str | None, str | None]:
    """(current revision, head revision) of the workspace's ledger."""
    return migrate.current_revision(workspace_settings(workspace).ledger_url), migrate.head_revision()
