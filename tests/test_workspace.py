"""Workspaces (`strata init`), the data and db commands, and the root DVC pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from strata.cli.app import app
from strata.tasks.data.versioning import git
from strata.tasks.ledger import migrate
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import find_workspace, init_workspace

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_init_creates_a_workspace_and_is_idempotent(tmp_path):
    workspace = tmp_path / "ws"
    changes = init_workspace(workspace)
    assert any("git repository" in c for c in changes) and any("DVC" in c for c in changes)
    assert (workspace / ".dvc").is_dir() and (workspace / "strata.toml").is_file()
    assert "/.strata/" in (workspace / ".gitignore").read_text().splitlines()
    settings = load_settings(workspace)
    assert migrate.current_revision(settings.ledger_url) == migrate.head_revision()
    assert Path(settings.mlflow_artifacts).is_dir() and Path(settings.dvc_remote).is_dir()
    assert "url = ../.strata/dvc-remote" in (workspace / ".dvc" / "config").read_text()
    assert git(workspace, "status", "--porcelain") == ""  # a new repository starts committed

    assert init_workspace(workspace) == []
    result = runner.invoke(app, ["init", str(workspace)])
    assert result.exit_code == 0 and "nothing changed" in result.output
    assert find_workspace(workspace / "data" / "deeper") == workspace.resolve()


def test_init_inside_an_existing_repository_and_with_another_remote(tmp_path):
    git_root = tmp_path / "repo"
    git_root.mkdir()
    git(git_root, "init", "-q")
    remote = tmp_path / "elsewhere"
    changes = init_workspace(git_root / "project", remote=str(remote))
    assert not any("git repository" in c for c in changes)
    assert not (git_root / "project" / ".git").exists()
    assert str(remote) in (git_root / "project" / ".dvc" / "config").read_text()
    assert load_settings(git_root / "project").dvc_remote == str(remote)


def _image_tree(root: Path, classes: list[str], per_class: int = 3) -> Path:
    rng = np.random.default_rng(len(classes))
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_cli_ingest_data_and_db_commands(tmp_path):
    workspace = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(workspace)]).exit_code == 0
    ws = ["--workspace", str(workspace)]
    source = _image_tree(tmp_path / "batch", ["cat", "dog"])

    result = runner.invoke(app, ["ingest", str(source), "--learner", "pets", *ws])
    assert result.exit_code == 0, result.output
    assert "ingested batch-" in result.output and "cat 2/1, dog 2/1" in result.output
    batch = result.output.split("ingested ", 1)[1].split()[0]
    again = runner.invoke(app, ["ingest", str(source), "--learner", "pets", *ws])
    assert "already ingested (nothing changed)" in again.output

    listing = runner.invoke(app, ["data", "list", *ws])
    assert listing.exit_code == 0 and batch in listing.output and "pets" in listing.output
    shown = runner.invoke(app, ["data", "show", batch, *ws])
    assert shown.exit_code == 0 and '"dog"' in shown.output and '"md5"' in shown.output
    assert runner.invoke(app, ["data", "show", "batch-nope", *ws]).exit_code == 2

    (source / "cat" / "0.png").write_bytes(b"broken")
    rejected = runner.invoke(app, ["ingest", str(source), "--learner", "pets", *ws])
    assert rejected.exit_code == 2 and "rejected" in rejected.output and "cat/0.png" in rejected.output

    assert "ledger at revision 0003 (head 0003)" in runner.invoke(app, ["db", "current", *ws]).output
    assert "ledger at revision None" in runner.invoke(app, ["db", "downgrade", "base", *ws]).output
    refused = runner.invoke(app, ["data", "list", *ws])
    assert refused.exit_code == 2 and "strata db upgrade" in " ".join(refused.output.split())
    assert "ledger at revision 0003" in runner.invoke(app, ["db", "upgrade", *ws]).output


@pytest.mark.slow
def test_dvc_repro_runs_the_root_pipeline(tmp_path, prefect_server):
    """stream → benchmark → report on digits with the tiny backbone, in a copy of the repository; the
    benchmark stage's flow reports to the session's Prefect server instead of starting its own."""
    from prefect.settings import PREFECT_API_URL

    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in (".dvc", "cli", "flows", "tasks", "models", "migrations"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp"))
    git(tmp_path, "init", "-q")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(tmp_path),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    dvc = [sys.executable, "-m", "dvc"]
    result = subprocess.run([*dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for stage in ("stream", "benchmark", "report"):
        assert f"Running stage '{stage}'" in result.stdout
    assert (tmp_path / "dvc.lock").is_file() and (tmp_path / "runs/dvc/accuracy_per_task.json").is_file()
    metrics = subprocess.run([*dvc, "metrics", "show"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "final_accuracy" in metrics.stdout
    status = subprocess.run([*dvc, "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout
