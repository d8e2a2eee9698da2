"""Ingest in a user's real git repository: refused in a detached or unfinished state, and committing only
Strata's own paths, without touching the user's index or edits, even when a commit hook refuses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from strata.cli.app import app
from strata.tasks.data.commits import CommitRefusedError, GitStateError
from strata.tasks.data.ingest import ingest
from strata.tasks.data.versioning import git
from strata.tasks.doctor.checks import diagnose
from strata.tasks.ledger.store import ledger_session, list_data_versions, make_engine
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import init_workspace
from tests.test_ingest import image_tree

runner = CliRunner()


@pytest.fixture()
def settings(tmp_path):
    init_workspace(tmp_path / "ws")
    return load_settings(tmp_path / "ws")


def _batch(tmp_path: Path, *classes: str) -> Path:
    return image_tree(tmp_path / "-".join(classes), dict.fromkeys(classes, 4))


def _batch_ids(settings) -> list[str]:
    engine = make_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        ids = [v.batch_id for v in list_data_versions(session)]
    engine.dispose()
    return ids


def _snapshot(settings) -> tuple[str, str, str, str, list[str]]:
    """HEAD, index, working-tree changes and files under data/: what a refused ingest must leave as it was."""
    ws = settings.workspace
    batches = ws / "data" / "batches"
    files = sorted(str(p.relative_to(ws)) for p in batches.rglob("*")) if batches.exists() else []
    return (
        git(ws, "rev-parse", "HEAD"),
        git(ws, "diff", "--cached"),
        git(ws, "diff"),
        git(ws, "status", "--porcelain", "--untracked-files=all"),
        files,
    )


def _changed_lines(diff: str) -> list[str]:
    """The added and removed lines of a diff, without the blob ids and hunk positions that a commit moves."""
    return [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def _conflict(ws: Path, operation: str) -> None:
    """Leave ``operation`` (merge, rebase, cherry-pick) stopped on a conflict, as git leaves it for the user."""
    branch = git(ws, "branch", "--show-current")
    (ws / "notes.txt").write_text("base\n")
    git(ws, "add", "notes.txt")
    git(ws, "commit", "-q", "-m", "base")
    git(ws, "switch", "-q", "-c", "other")
    (ws / "notes.txt").write_text("theirs\n")
    git(ws, "commit", "-q", "-am", "theirs")
    git(ws, "switch", "-q", branch)
    (ws / "notes.txt").write_text("ours\n")
    git(ws, "commit", "-q", "-am", "ours")
    args = {"merge": ["merge", "other"], "rebase": ["rebase", "other"], "cherry-pick": ["cherry-pick", "other"]}
    stopped = subprocess.run(["git", *args[operation]], cwd=ws, capture_output=True, text=True)
    assert stopped.returncode != 0, stopped.stdout


def test_a_detached_head_is_refused_before_anything_is_written(settings, tmp_path):
    ws = settings.workspace
    ingest(settings, _batch(tmp_path, "cat", "dog"), "pets")
    git(ws, "switch", "-q", "--detach")
    before, batch = _snapshot(settings), _batch(tmp_path, "cow", "pig")
    result = runner.invoke(app, ["ingest", str(batch), "--learner", "pets", "-w", str(ws)])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "detached at" in line and "git switch" in line, line
    assert _snapshot(settings) == before and len(_batch_ids(settings)) == 1
    git(ws, "switch", "-q", "-")
    assert ingest(settings, batch, "pets").created
    assert diagnose(settings) == []


@pytest.mark.parametrize("operation", ["merge", "rebase", "cherry-pick"])
def test_an_unfinished_operation_is_refused_with_the_way_out(settings, tmp_path, operation):
    _conflict(settings.workspace, operation)
    before = _snapshot(settings)
    with pytest.raises(GitStateError, match=f"middle of .*{operation.split('-')[0]}.*--abort"):
        ingest(settings, _batch(tmp_path, "cat", "dog"), "pets")
    assert _snapshot(settings) == before and _batch_ids(settings) == []


def test_the_users_staged_and_unstaged_changes_stay_out_of_the_commit(settings, tmp_path):
    ws = settings.workspace
    first = ingest(settings, _batch(tmp_path, "cat", "dog"), "pets")
    gitignore = ws / "data" / "batches" / ".gitignore"
    gitignore.write_text(gitignore.read_text() + "/scratch-notes\n")  # the user's unstaged edit of a file DVC edits
    (ws / ".dvcignore").write_text((ws / ".dvcignore").read_text() + "*.tmp\n")
    (ws / "README.md").write_text("my project\n")
    git(ws, "add", "README.md")  # and a staged new file
    staged, unstaged = git(ws, "diff", "--cached"), _changed_lines(git(ws, "diff", "-U0"))

    second = ingest(settings, _batch(tmp_path, "cow", "pig"), "pets")
    changed = git(ws, "show", "--name-only", "--format=", second.git_rev).splitlines()
    assert sorted(changed) == ["data/batches/.gitignore", f"data/batches/{second.batch_id}.dvc"]
    committed = git(ws, "show", f"{second.git_rev}:data/batches/.gitignore").splitlines()
    assert committed == [f"/{first.batch_id}", f"/{second.batch_id}"]  # DVC's line, not the user's
    assert git(ws, "diff", "--cached") == staged and _changed_lines(git(ws, "diff", "-U0")) == unstaged
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True).stdout
    assert status.splitlines() == [" M .dvcignore", "A  README.md", " M data/batches/.gitignore"]
    assert diagnose(settings) == []


def test_a_refusing_commit_hook_records_nothing(settings, tmp_path):
    ws = settings.workspace
    ingest(settings, _batch(tmp_path, "cat", "dog"), "pets")
    hook = Path(git(ws, "rev-parse", "--git-path", "hooks"))
    hook = (hook if hook.is_absolute() else ws / hook) / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'lint: 1 file would be reformatted' >&2\nexit 1\n")
    hook.chmod(0o755)
    (ws / "README.md").write_text("my project\n")
    git(ws, "add", "README.md")
    before, batch = _snapshot(settings), _batch(tmp_path, "cow", "pig")
    with pytest.raises(CommitRefusedError, match="refused by the pre-commit hook .*would be reformatted"):
        ingest(settings, batch, "pets")
    assert _snapshot(settings) == before and len(_batch_ids(settings)) == 1
    hook.unlink()
    assert ingest(settings, batch, "pets").created
    assert git(ws, "diff", "--cached", "--name-only") == "README.md"
    assert diagnose(settings) == []
