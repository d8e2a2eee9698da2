"""A workspace moved with ``mv`` keeps working; one copied with ``cp -a`` is a new workspace that never reads or
writes the original; one from before workspace ids (revision 0002, absolute checkpoints) migrates on first use.

The session's learned workspace (``learned_digits``: two tasks) is never changed; each test works on a ``cp -a`` of
it, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from sqlalchemy import select

from strata.flows.export import ExportParams, export_version
from strata.flows.learn import LearnParams, learn
from strata.tasks.data.ingest import ingest
from strata.tasks.doctor.checks import diagnose
from strata.tasks.ledger import migrate
from strata.tasks.ledger.store import DataVersion, Increment, WorkspaceRow, ledger_session, make_engine
from strata.tasks.tracking.promotion import GateConfig
from strata.tasks.training.restore import restore_method
from strata.tasks.workspace.identity import IDENTITY_FILE, open_workspace
from strata.tasks.workspace.mlflow_store import ID_TAG
from strata.tasks.workspace.settings import StrataSettings, load_settings
from tests.conftest import cp_a

LENIENT = GateConfig(old_accuracy_budget=1.0, accuracy_floor=0.0)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (names, links and bytes), hashed: nothing excluded."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            digests[name] = "link:" + os.readlink(path)
        elif path.is_file():
            digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digests[name] = "dir"
    return digests


def _learn(settings: StrataSettings) -> dict:
    return learn(LearnParams(learner="digits", workspace=str(settings.workspace), show_progress=False, gate=LENIENT))


def _client(settings: StrataSettings) -> MlflowClient:
    return MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)


def _stored_text(settings: StrataSettings) -> str:
    """Every value of both SQLite stores, as one text: what a stale absolute path would show up in."""
    values = []
    for url in (settings.ledger_url, settings.mlflow_tracking_uri):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
                values += [repr(row) for row in db.execute(f'SELECT * FROM "{table}"')]
    return "\n".join(values)


def _ids(settings: StrataSettings) -> tuple[str, str, set[str]]:
    """The workspace id as the ledger, workspace.json and the learner's experiments hold it."""
    engine = make_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        ledger_id = session.scalar(select(WorkspaceRow.id))
    engine.dispose()
    recorded = json.loads((settings.state_dir / IDENTITY_FILE).read_text())
    tags = {e.tags.get(ID_TAG) for e in _client(settings).search_experiments(filter_string="name LIKE 'strata/%'")}
    return ledger_id, recorded["id"], tags


def test_a_moved_workspace_learns_a_third_task_and_exports_there(learned_digits, tmp_path, digit_batches):
    """``mv`` to a path with a space (MLflow percent-encodes it in its URIs): the third task starts from the
    second's checkpoint under the new root, its artifacts land there, and the export reads them there."""
    first = cp_a(learned_digits, tmp_path / "first")
    before = open_workspace(first)
    (tmp_path / "first").rename(tmp_path / "moved here")
    settings = load_settings(tmp_path / "moved here")

    ingest(settings, digit_batches[2], "digits")
    assert _learn(settings)["tasks"] == 3
    report = export_version(settings, ExportParams(learner="digits", version="3", log_model=False))

    assert Path(report["directory"]).is_relative_to(settings.workspace)
    assert open_workspace(settings).id == before.id  # a move keeps the id
    assert json.loads(Path(report["directory"], "model.json").read_text())["workspace_id"] == before.id
    assert json.loads((settings.state_dir / IDENTITY_FILE).read_text())["root"] == str(settings.workspace)
    stored = _stored_text(settings)
    assert str(tmp_path / "first") not in stored and str(learned_digits) not in stored
    run = _client(settings).get_run(_client(settings).get_model_version("strata-digits", "3").run_id)
    assert mlflow.artifacts.download_artifacts(run.info.artifact_uri, dst_path=str(tmp_path / "art")).startswith(
        str(tmp_path / "art")
    )
    assert Path(settings.mlflow_artifacts, run.info.run_id).is_dir()
    assert diagnose(settings) == []


def test_a_copy_is_a_new_workspace_that_never_touches_the_original(learned_digits, tmp_path, digit_batches, caplog):
    """``cp -a`` then learn in the copy: the original's files are byte for byte as they were, the copy learned
    from its own checkpoint and logged into its own artifact root, and it has an id of its own."""
    original = tree_digest(learned_digits)
    settings = cp_a(learned_digits, tmp_path / "copy")
    ingest(settings, digit_batches[2], "digits")
    with caplog.at_level(logging.INFO, logger="strata.tasks.workspace.identity"):
        assert _learn(settings)["tasks"] == 3

    assert tree_digest(learned_digits) == original
    assert [r.getMessage() for r in caplog.records if "is a copy of workspace" in r.getMessage()] != []
    stored = _stored_text(settings)
    assert str(learned_digits) not in stored
    client = _client(settings)
    for version in ("1", "2", "3"):
        run = client.get_run(client.get_model_version("strata-digits", version).run_id)
        assert run.info.artifact_uri.startswith(settings.workspace.as_uri() + "/.strata/mlartifacts/")
    ledger_id, recorded_id, tags = _ids(settings)
    original_settings = load_settings(learned_digits)
    assert ledger_id == recorded_id and tags == {ledger_id}
    assert ledger_id != _ids(original_settings)[0]
    assert diagnose(settings) == [] and diagnose(original_settings) == []


def test_a_workspace_from_before_ids_migrates_on_first_use(learned_digits, tmp_path):
    """A workspace made before this change (ledger at 0002 with absolute checkpoints, experiments with no
    workspace id, no workspace.json) that was then moved: its first command migrates the ledger, makes the
    checkpoints relative, gives it an id and points MLflow's locations at where it is now."""
    settings = cp_a(learned_digits, tmp_path / "old")
    old_root = Path("/srv/where-it-was/ws")
    engine = make_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        for row in session.scalars(select(Increment)):
            row.checkpoint_uri = f"{old_root}/{row.checkpoint_uri}"
        for version in session.scalars(select(DataVersion)):
            version.remote = f"{old_root}/.strata/dvc-remote"
    engine.dispose()
    migrate.downgrade(settings.ledger_url, "0002")
    with sqlite3.connect(settings.mlflow_tracking_uri.removeprefix("sqlite:///")) as db:
        db.execute("DELETE FROM experiment_tags WHERE key = ?", (ID_TAG,))
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            db.execute(
                f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(settings.workspace), str(old_root))
            )
    (settings.state_dir / IDENTITY_FILE).unlink()

    identity = open_workspace(settings)

    assert migrate.current_revision(settings.ledger_url) == migrate.head_revision()
    engine = make_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        checkpoints = list(session.scalars(select(Increment.checkpoint_uri).order_by(Increment.task_index)))
        remotes = set(session.scalars(select(DataVersion.remote)))
    engine.dispose()
    assert checkpoints == [f".strata/increments/digits/task-00{t}/state" for t in (0, 1)]
    assert remotes == {".strata/dvc-remote"}
    assert restore_method(settings.resolve(checkpoints[-1])).class_names == ["0", "1", "2", "3"]
    assert _ids(settings) == (identity.id, identity.id, {identity.id})
    client = _client(settings)
    run_id = client.get_model_version("strata-digits", "2").run_id
    state = client.download_artifacts(run_id, "state", str(tmp_path / "state"))
    assert Path(state, "state.safetensors").is_file()
    assert str(old_root) not in _stored_text(settings)
    assert diagnose(settings) == []
