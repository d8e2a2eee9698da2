"""DVC and git operations on a workspace, serialised by a file lock.

DVC refuses concurrent commands in one workspace ("Unable to acquire lock"), so every Strata DVC
operation goes through ``dvc_lock``. A data version is the md5 (with its hash name) in the ``.dvc``
file plus the git commit that holds that file. The git side (``git``, ``commit_paths``) lives in
``strata.tasks.data.commits`` and is importable from here as well.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from dvc.logger import set_loggers_level  # importing dvc binds its log handlers to the process's stdout
from dvc.repo import Repo
from filelock import FileLock

from strata.tasks.data.commits import VersioningError as VersioningError
from strata.tasks.data.commits import commit_paths as commit_paths
from strata.tasks.data.commits import git as git
from strata.tasks.workspace.settings import STATE_DIR

LOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class DvcOut:
    md5: str
    hash_name: str


@contextmanager
def dvc_lock(workspace: Path) -> Iterator[None]:
    """Hold the workspace's DVC lock (waits up to LOCK_TIMEOUT_S for another Strata process)."""
    (workspace / STATE_DIR).mkdir(exist_ok=True)
    with FileLock(workspace / STATE_DIR / "dvc.lock", timeout=LOCK_TIMEOUT_S):
        yield


def dvc_file(path: Path) -> Path:
    return path.with_name(path.name + ".dvc")


def read_dvc_out(path: Path) -> DvcOut:
    """The md5 and hash name recorded for ``path`` in its ``.dvc`` file."""
    try:
        out = yaml.safe_load(dvc_file(path).read_text())["outs"][0]
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError) as exc:
        raise VersioningError(f"{dvc_file(path)} is missing or not a DVC file: {exc}") from exc
    return DvcOut(out["md5"], out.get("hash", "md5-dos2unix"))


@contextmanager
def dvc_repo(workspace: Path) -> Iterator[Repo]:
    """The workspace's DVC repo, without DVC's hints on stdout ("git add …"): Strata commits for the user."""
    with set_loggers_level(logging.WARNING), Repo(str(workspace)) as repo:
        yield repo


def dvc_add(workspace: Path, path: Path) -> DvcOut:
    with dvc_repo(workspace) as repo:
        repo.add(str(path))
    return read_dvc_out(path)


def dvc_push(workspace: Path, path: Path) -> None:
    with dvc_repo(workspace) as repo:
        repo.push(targets=[str(dvc_file(path))])


def dvc_pull(workspace: Path, path: Path) -> None:
    """Check ``path`` out of the cache, fetching from the default remote what the cache lacks."""
    with dvc_repo(workspace) as repo:
        repo.pull(targets=[str(dvc_file(path))], force=True)


def directory_md5(path: Path) -> str:
    """DVC's ``.dir`` md5 of a folder, computed afresh (no DVC state cache) so a changed file is caught."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="strata-md5-") as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(path), fs, "md5", dry_run=True)
    if obj.hash_info.value is None:
        raise VersioningError(f"DVC computed no md5 for {path}")
    return obj.hash_info.value
