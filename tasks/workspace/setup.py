"""Workspaces: a git + DVC repository with ``strata.toml``, a migrated ledger and the embedded stores.

``init_workspace`` is idempotent: each step checks before it acts and reports only what it changed,
so running it twice changes nothing and says so. It ends by giving a new workspace its id
(``strata.tasks.workspace.identity``), and refuses to start an empty ledger where a lost one left MLflow runs.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from dvc.logger import set_loggers_level
from dvc.repo import Repo

from strata.tasks.data.versioning import commit_paths, dvc_repo, git
from strata.tasks.ledger import migrate
from strata.tasks.workspace import identity
from strata.tasks.workspace.settings import SETTINGS_FILE, STATE_DIR, StrataSettings, load_settings

REMOTE_NAME = "strata"
WORKSPACE_MARKERS = (SETTINGS_FILE, ".dvc")  # a folder holding either is a workspace root
SETTINGS_TEMPLATE = """\
# Strata workspace settings; STRATA_* environment variables override them.
# ledger_url = "postgresql+psycopg://user@host/strata"   # default: sqlite in .strata/strata.db
# mlflow_tracking_uri = "http://mlflow:5000"             # default: sqlite in .strata/mlflow.db
"""


def find_workspace(start: Path | None = None) -> Path:
    """The workspace containing ``start`` (default cwd): nearest folder with strata.toml, else with .dvc/."""
    start = (start or Path.cwd()).resolve()
    for marker in WORKSPACE_MARKERS:
        for folder in (start, *start.parents):
            if (folder / marker).exists():
                return folder
    return start


def workspace_settings(workspace: Path | None) -> StrataSettings:
    """Settings of ``workspace``, or of the workspace that contains the current directory."""
    return load_settings(workspace or find_workspace())


def init_workspace(directory: Path, remote: str | None = None) -> list[str]:
    """Make ``directory`` a workspace; returns what changed (empty when it already was one)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    changes: list[str] = []
    if not _inside_git(directory):
        git(directory, "init", "-q")
        changes.append("created a git repository")
    if not (directory / ".dvc").is_dir():
        with set_loggers_level(logging.WARNING):
            Repo.init(str(directory), subdir=_git_root(directory) != directory).close()
        changes.append("initialised DVC")
    if _ensure_line(directory / ".gitignore", f"/{STATE_DIR}/"):
        changes.append(f"ignored {STATE_DIR}/ in .gitignore")
    settings_file = directory / SETTINGS_FILE
    if not settings_file.exists():
        settings_file.write_text(SETTINGS_TEMPLATE + (f'dvc_remote = "{remote}"\n' if remote else ""))
        changes.append(f"wrote {SETTINGS_FILE}")
    settings = load_settings(directory)
    for folder in (str(settings.state_dir), settings.mlflow_artifacts):
        if "://" not in folder and not Path(folder).is_dir():
            Path(folder).mkdir(parents=True)
            changes.append(f"created {folder}")
    changes += _ensure_remote(directory, remote or settings.dvc_remote)
    if "created a git repository" in changes:
        files = [directory / p for p in (".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", SETTINGS_FILE)]
        commit_paths(directory, [p for p in files if p.exists()], "strata: initialise the workspace")
    if migrate.current_revision(settings.ledger_url) != migrate.head_revision():
        identity.refuse_a_lost_ledger(settings)  # an empty ledger would disown the runs a lost one recorded
        migrate.upgrade(settings.ledger_url)
        changes.append(f"migrated the ledger to {migrate.head_revision()}")
    if identity.open_workspace(settings).change:
        changes.append("recorded where the workspace is now (it was moved or copied)")
    return changes


def _inside_git(directory: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=directory, capture_output=True).returncode == 0


def _git_root(directory: Path) -> Path:
    return Path(git(directory, "rev-parse", "--show-toplevel")).resolve()


def _ensure_line(path: Path, line: str) -> bool:
    text = path.read_text() if path.exists() else ""
    if line in text.splitlines():
        return False
    path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")
    return True


def _ensure_remote(directory: Path, url: str) -> list[str]:
    """Make ``url`` the default DVC remote; a local folder inside the workspace is stored relative to .dvc/."""
    written = url
    if "://" not in url:
        url = str(Path(url).resolve())
        Path(url).mkdir(parents=True, exist_ok=True)
        if Path(url).is_relative_to(directory):  # DVC stores a relative path relative to .dvc/config
            written = os.path.relpath(url, Path.cwd())
    with dvc_repo(directory) as repo:
        current = repo.config["remote"].get(REMOTE_NAME, {}).get("url")
        if current == url and repo.config["core"].get("remote") == REMOTE_NAME:
            return []
        with repo.config.edit() as config:
            config["remote"][REMOTE_NAME] = {"url": written}
            config["core"]["remote"] = REMOTE_NAME
    return [f"set the default DVC remote {REMOTE_NAME!r} to {url}"]
