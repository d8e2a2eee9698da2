"""Git commits of Strata's own paths that never touch the user's index, edits or branch state.

Strata commits into the user's repository, so it must leave everything else as it found it. Before
any write, ``check_git_state`` refuses a detached HEAD (the commit would sit on no branch) and an
unfinished merge, rebase, ``am``, cherry-pick or revert (the commit would land inside it).
``commit_paths`` commits through a temporary index built from HEAD: only Strata's paths are added
there, so what the user staged is never swept in, and a line Strata appends to a file the user may
also be editing (DVC's ``/batch`` line in a ``.gitignore``) is committed alone, without the user's
unstaged edits of that file. The real index is updated afterwards for just those paths; when a hook
refuses the commit it has not been touched at all.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from strata.models.errors import UnavailableError, UserError

COMMIT_HOOKS = ("pre-commit", "prepare-commit-msg", "commit-msg")
UNFINISHED = (  # what git keeps while an operation waits for the user, and how to finish or abort it
    ("rebase-merge", "a rebase", "git rebase --continue, or git rebase --abort"),
    ("rebase-apply", "a rebase or git am", "git rebase --continue / git am --continue, or --abort"),
    ("MERGE_HEAD", "a merge", "git commit, or git merge --abort"),
    ("CHERRY_PICK_HEAD", "a cherry-pick", "git cherry-pick --continue, or git cherry-pick --abort"),
    ("REVERT_HEAD", "a revert", "git revert --continue, or git revert --abort"),
)


class VersioningError(UnavailableError, RuntimeError):
    """A git or DVC step failed; the message names the command and its output."""


class GitStateError(UserError, RuntimeError):
    """The repository is in a state Strata must not commit in (detached HEAD, an unfinished merge …)."""


class CommitRefusedError(UserError, RuntimeError):
    """A commit hook of the user's repository refused Strata's commit; nothing was committed."""


def git(workspace: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run git in the workspace; an author identity is supplied when the user has none configured."""
    result = _run(workspace, args, env)
    if result.returncode != 0:
        raise VersioningError(f"git {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def _run(workspace: Path, args: tuple[str, ...], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    identity = [] if _has_identity(workspace) else ["-c", "user.name=Strata", "-c", "user.email=strata@localhost"]
    return subprocess.run(
        ["git", *identity, *args], cwd=workspace, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def _has_identity(workspace: Path) -> bool:
    result = subprocess.run(["git", "config", "user.email"], cwd=workspace, capture_output=True, text=True)
    return bool(result.stdout.strip())


def _git_path(workspace: Path, name: str) -> Path:
    return workspace / git(workspace, "rev-parse", "--git-path", name)


def check_git_state(workspace: Path) -> None:
    """Refuse an unfinished operation or a detached HEAD, naming it and the way out (nothing is written)."""
    for name, operation, fix in UNFINISHED:
        if _git_path(workspace, name).exists():
            raise GitStateError(
                f"git repository {workspace} is in the middle of {operation} ({name}): finish it ({fix}) "
                f"and run the command again"
            )
    if _run(workspace, ("symbolic-ref", "-q", "HEAD")).returncode != 0:
        at = git(workspace, "rev-parse", "--short", "HEAD")
        branches = git(workspace, "for-each-ref", "--format=%(refname:short)", "refs/heads").splitlines()
        switch = f"git switch {'main' if 'main' in branches else branches[0]}" if branches else "git switch -c main"
        raise GitStateError(
            f"git HEAD of {workspace} is detached at {at}: check out a branch ({switch}) and run the command again"
        )


def commit_paths(
    workspace: Path, paths: list[Path], message: str, lines: Mapping[Path, list[str]] | None = None
) -> str:
    """Commit ``paths`` as they are in the working tree and ``lines`` appended to the committed version of
    their files, and nothing else; returns the commit that holds them (HEAD's when nothing changed).

    ``paths`` are Strata's own files; ``lines`` are for files the user may edit too: their staged and
    unstaged changes stay exactly as they were (staged changes keep the appended lines, so committing
    them later does not drop Strata's).
    """
    check_git_state(workspace)
    lines = dict(lines or {})
    owned = [_relative(workspace, p) for p in paths]
    shared = {_relative(workspace, p): wanted for p, wanted in lines.items()}
    head = _head(workspace)
    with tempfile.TemporaryDirectory(prefix="strata-index-") as scratch:
        index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        git(workspace, "read-tree", *([head] if head else ["--empty"]), env=index)
        if owned:
            git(workspace, "add", "--", *owned, env=index)
        for path, wanted in shared.items():
            _stage_blob(workspace, path, _appended(_blob(workspace, f"{head}:./{path}") if head else "", wanted), index)
        changed = _run(workspace, ("diff", "--cached", "--quiet", *([head] if head else []), "--"), index)
        if head is None or changed.returncode != 0:
            _commit(workspace, message, index)
    if owned:
        git(workspace, "reset", "-q", "--", *owned)
    for path, wanted in shared.items():
        staged = _run(workspace, ("rev-parse", "-q", "--verify", f":./{path}"))
        if staged.returncode == 0:  # the user's staged version, with Strata's lines: their change stays staged
            _stage_blob(workspace, path, _appended(_blob(workspace, f":./{path}"), wanted))
        else:
            git(workspace, "reset", "-q", "--", path)
    return git(workspace, "log", "-1", "--format=%H", "--", (owned or list(shared))[0])


def _relative(workspace: Path, path: Path) -> str:
    return path.relative_to(workspace).as_posix()


def _head(workspace: Path) -> str | None:
    """HEAD's commit, or None on a branch without commits yet."""
    result = _run(workspace, ("rev-parse", "-q", "--verify", "HEAD^{commit}"))
    return result.stdout.strip() if result.returncode == 0 else None


def _blob(workspace: Path, spec: str) -> str:
    """The text of ``spec`` (``REV:path`` or ``:path``), empty when it does not exist."""
    result = _run(workspace, ("cat-file", "-p", spec))
    return result.stdout if result.returncode == 0 else ""


def _appended(text: str, wanted: list[str]) -> str:
    """``text`` with each wanted line it lacks appended, one per line (as DVC and ``strata init`` add them)."""
    missing = [line for line in wanted if line not in text.splitlines()]
    if not missing:
        return text
    return text + ("" if not text or text.endswith("\n") else "\n") + "".join(f"{line}\n" for line in missing)


def _stage_blob(workspace: Path, path: str, text: str, env: Mapping[str, str] | None = None) -> None:
    result = subprocess.run(
        ["git", "hash-object", "-w", "--stdin", f"--path={path}"],
        cwd=workspace,
        input=text,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise VersioningError(f"git hash-object of {path} failed: {result.stderr.strip()}")
    git(workspace, "update-index", "--add", "--cacheinfo", f"100644,{result.stdout.strip()},{path}", env=env)


def _commit(workspace: Path, message: str, index: Mapping[str, str]) -> None:
    result = _run(workspace, ("commit", "-q", "-m", message), index)
    if result.returncode == 0:
        return
    output = (result.stderr.strip() or result.stdout.strip()).splitlines()
    detail = output[-1] if output else f"exit status {result.returncode}"
    hooks = [name for name in COMMIT_HOOKS if os.access(_hooks_dir(workspace) / name, os.X_OK)]
    if hooks:
        raise CommitRefusedError(
            f"git commit {message!r} was refused by the {' or '.join(hooks)} hook in {_hooks_dir(workspace)} "
            f"({detail}); nothing was recorded: make the hook accept the commit and run the command again"
        )
    raise VersioningError(f"git commit {message!r} failed: {detail}")


def _hooks_dir(workspace: Path) -> Path:
    configured = _run(workspace, ("config", "core.hooksPath")).stdout.strip()
    return (workspace / Path(configured).expanduser()) if configured else _git_path(workspace, "hooks")
