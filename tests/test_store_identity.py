"""Stores are identified and never silently recreated: an emptied MLflow store, a lost ledger, a ledger or store
copied in from another workspace each stop a command with one line naming the file, what is wrong and the fix;
a copy whose store is shared (a tracking server, a PostgreSQL ledger) is told so on first use.

The session's learned workspace (``learned_digits``: two tasks) is never changed; each test damages a ``cp -a`` of it.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from strata.cli.app import app
from strata.models.errors import UserError
from strata.tasks.doctor.checks import diagnose
from strata.tasks.ledger import migrate
from strata.tasks.ledger.store import Increment, WorkspaceRow, ledger_session, make_engine
from strata.tasks.tracking import runs
from strata.tasks.workspace.identity import IDENTITY_FILE, StoreError, open_workspace
from strata.tasks.workspace.mlflow_store import ID_TAG
from strata.tasks.workspace.settings import StrataSettings, load_settings
from strata.tasks.workspace.setup import init_workspace
from tests.conftest import cp_a, free_port, scratch_postgres_database

runner = CliRunner()
SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    return lines[0]


def _increments(settings: StrataSettings) -> int:
    engine = make_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        count = session.scalar(select(func.count()).select_from(Increment))
    engine.dispose()
    return count


@pytest.mark.parametrize(("damage", "problem"), [(b"", "is empty (0 bytes)"), (b"x" * 4096, "is not an SQLite")])
def test_an_emptied_mlflow_store_stops_every_command_and_stays_as_it_is(learned_digits, tmp_path, damage, problem):
    """MLflow would create a fresh store over it and the learn after would register "version 1" and promote it."""
    settings = cp_a(learned_digits, tmp_path / "ws")
    store = settings.state_dir / "mlflow.db"
    store.write_bytes(damage)
    ws = ["-w", str(settings.workspace)]

    for args in (["learn", "--learner", "digits"], ["status"], ["export", "--learner", "digits"]):
        result = runner.invoke(app, [*args, *ws])
        assert result.exit_code == UserError.exit_code, result.output
        line = one_error_line(result.output)
        assert f"the MLflow store .strata/mlflow.db {problem}" in line
        assert "the ledger records 2 learned increments: restore .strata/mlflow.db from a backup" in line
    with pytest.raises(StoreError, match="restore .strata/mlflow.db from a backup"):
        runs.configure(settings)  # a deployment's flow run opens the store here, without the CLI

    assert store.read_bytes() == damage and _increments(settings) == 2
    # the doctor names exactly this damage: an empty store itself, any other through the store checks
    assert [f.store for f in diagnose(settings)] == ["mlflow" if not damage else "stores"]


def test_a_file_that_is_no_mlflow_store_is_never_written_over_even_before_the_first_learn(tmp_path):
    """Nothing learned yet, so nothing of Strata's is lost, but the file is someone's: MLflow would fail on it with a
    raw SQLite traceback, and the doctor too, before this check."""
    init_workspace(tmp_path / "ws")
    settings = load_settings(tmp_path / "ws")
    store = settings.state_dir / "mlflow.db"
    store.write_bytes(b"notes, not a database\n")

    result = runner.invoke(app, ["learn", "--learner", "digits", "-w", str(settings.workspace)])
    assert result.exit_code == UserError.exit_code, result.output
    assert "the MLflow store .strata/mlflow.db is not an SQLite database: restore it" in one_error_line(result.output)
    doctor = runner.invoke(app, ["doctor", "-w", str(settings.workspace)])
    assert doctor.exit_code == 4, doctor.output
    assert "stores: .strata: the MLflow store .strata/mlflow.db is not an SQLite" in doctor.output
    assert store.read_bytes() == b"notes, not a database\n"


def test_a_lost_ledger_with_mlflow_runs_advises_repair_never_init(learned_digits, tmp_path):
    """`strata init` there would start an empty ledger that disowns every run; it refuses as the others do."""
    settings = cp_a(learned_digits, tmp_path / "ws")
    ledger = settings.state_dir / "strata.db"
    ledger.unlink()

    for args in (["status", "-w", str(settings.workspace)], ["init", str(settings.workspace)]):
        result = runner.invoke(app, args)
        assert result.exit_code == UserError.exit_code, result.output
        line = one_error_line(result.output)
        assert "the ledger .strata/strata.db is missing, but the MLflow store .strata/mlflow.db holds" in line
        assert "run `strata doctor --repair`" in line and "strata init" not in line

    assert not ledger.exists()  # nothing made an empty one in its place
    assert [f.store for f in diagnose(settings)] == ["ledger"]


def test_a_new_workspace_has_one_id_in_every_store(tmp_path):
    settings = load_settings(tmp_path / "ws")
    init_workspace(settings.workspace)
    recorded = json.loads((settings.state_dir / IDENTITY_FILE).read_text())
    engine = make_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        assert list(session.scalars(select(WorkspaceRow.id))) == [recorded["id"]]
    engine.dispose()
    assert recorded["root"] == str(settings.workspace)
    experiment = runs.experiment_id(runs.configure(settings), settings, "pets")
    assert runs.configure(settings).get_experiment(experiment).tags[ID_TAG] == recorded["id"]
    assert runner.invoke(app, ["status", "-w", str(settings.workspace)]).exit_code == 0


@pytest.mark.parametrize("store", ["strata.db", "mlflow.db"])
def test_a_store_copied_in_from_another_workspace_is_refused_naming_both_ids(learned_digits, tmp_path, store):
    mine, other = cp_a(learned_digits, tmp_path / "mine"), cp_a(learned_digits, tmp_path / "other")
    mine_id, other_id = open_workspace(mine).id, open_workspace(other).id
    assert mine_id != other_id
    shutil.copy2(other.state_dir / store, mine.state_dir / store)

    result = runner.invoke(app, ["status", "-w", str(mine.workspace)])
    assert result.exit_code == UserError.exit_code, result.output
    line = one_error_line(result.output)
    what = "ledger" if store == "strata.db" else "MLflow store"
    assert f"the {what} .strata/{store} belongs to workspace {other_id}, not to this workspace {mine_id}" in line
    assert "from a backup" in line


def test_a_copy_sharing_a_tracking_server_is_told_so_once_and_works_on(learned_digits, tmp_path, monkeypatch, caplog):
    settings = cp_a(learned_digits, tmp_path / "copy")
    monkeypatch.setenv("STRATA_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    settings = load_settings(settings.workspace)
    with caplog.at_level(logging.INFO, logger="strata.tasks.workspace.identity"):
        copied = open_workspace(settings)
        again = open_workspace(settings)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert copied.change == "copied" and again.change == "" and again.id == copied.id
    assert len(warnings) == 1 and "shares its MLflow store http://127.0.0.1:" in warnings[0]
    assert "mlflow_tracking_uri in strata.toml" in warnings[0]


def test_a_copy_sharing_a_postgresql_ledger_keeps_its_id_and_says_so(tmp_path, monkeypatch, caplog):
    """The ledger is the original's too: re-identifying the copy there would disown the original."""
    with scratch_postgres_database("strata_identity") as database:
        monkeypatch.setenv("STRATA_LEDGER_URL", f"{SERVER}/{database}")
        init_workspace(tmp_path / "ws")
        original = open_workspace(load_settings(tmp_path / "ws"))
        settings = cp_a(tmp_path / "ws", tmp_path / "copy")
        with caplog.at_level(logging.WARNING, logger="strata.tasks.workspace.identity"):
            copied = open_workspace(settings)
        assert copied.id == original.id and copied.change == "copied"
        assert any("shares its ledger" in r.getMessage() and "ledger_url" in r.getMessage() for r in caplog.records)
        assert open_workspace(load_settings(tmp_path / "ws")).id == original.id
        assert migrate.current_revision(settings.ledger_url) == migrate.head_revision()
