"""DVC and git operations on a workspace, serialised by a file lock.

DVC refuses concurrent commands in one workspace ("Unable to acquire lock"), so every Strata DVC
operation goes through ``dvc_lock``. A data version is the md5 (with its hash name) in the ``.dvc``
file plus the git commit that holds that file.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from dvc.logger import set_loggers_level  # importing dvc binds its log handlers to the process's stdout
from dvc.repo import Repo
from filelock import FileLock

from strata.models.errors import UnavailableError
from strata.tasks.workspace.settings import STATE_DIR

LOCK_TIMEOUT_S = 600


class VersioningError(UnavailableError, RuntimeError):
    """A git or DVC step failed; the message names the command and its output."""


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


def git(workspace: Path, *args: str) -> str:
    """Run git in the workspace; an author identity is supplied when the user has none configured."""
    identity = [] if _has_identity(workspace) else ["-c", "user.name=Strata", "-c", "user.email=strata@localhost"]
    result = subprocess.run(["git", *identity, *args], cwd=workspace, capture_output=True, text=True)
    if result.returncode != 0:
        raise VersioningError(f"git {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def _has_identity(workspace: Path) -> bool:
    result = subprocess.run(["git", "config", "user.email"], cwd=workspace, capture_output=True, text=True)
    return bool(result.stdout.strip())


def commit_paths(workspace: Path, paths: list[Path], message: str) -> str:
    """Commit exactly ``paths`` (other staged changes stay staged); returns the commit holding them."""
    relative = [str(p.relative_to(workspace)) for p in paths]
    git(workspace, "add", "--", *relative)
    if git(workspace, "status", "--porcelain", "--", *relative):
        git(workspace, "commit", "-q", "-m", message, "--", *relative)
    return git(workspace, "log", "-1", "--format=%H", "--", relative[0])
