"""The PostgreSQL behind the ledger and MLflow drops its connections in the middle of ``learn``.

``pg_terminate_backend`` is what a database restart, a failover or an administrator does to every
open session. Idle pooled connections are replaced (the run goes on); a connection lost inside a
ledger transaction is a clear error with nothing half-written, and the next ``learn`` completes.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from sqlalchemy import event, select, text
from sqlalchemy.engine import Engine

from flows.learn import LearnParams, learn
from models.methods.base import Method
from tasks.increments import increments
from tasks.ingest import ingest
from tasks.ledger import LearnedClass, LedgerError, find_learner, ledger_session
from tasks.migrate import migrated_engine
from tasks.registry import GateConfig
from tasks.settings import load_settings
from tasks.workspace import init_workspace
from tests.conftest import scratch_postgres_database

LENIENT = GateConfig(old_accuracy_budget=1.0, accuracy_floor=0.0)
SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture()
def pg_workspace(tmp_path, monkeypatch, digit_batches):
    """A workspace whose ledger and MLflow store are one scratch PostgreSQL database, one batch ingested."""
    with scratch_postgres_database("strata_loss") as database:
        url = f"{SERVER}/{database}"
        monkeypatch.setenv("STRATA_LEDGER_URL", url)
        monkeypatch.setenv("STRATA_MLFLOW_TRACKING_URI", url)
        init_workspace(tmp_path / "ws")
        settings = load_settings(tmp_path / "ws")
        ingest(settings, digit_batches[0], "digits")
        yield settings, database


def _terminate(database: str, pid: int | None = None) -> int:
    """Terminate ``pid``'s backend, or every backend on ``database`` but the caller's; returns how many."""
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=postgres", autocommit=True) as admin:
        where = "pid = %s" if pid else "datname = %s AND pid <> pg_backend_pid()"
        return len(admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}",
                                 (pid or database,)).fetchall())


def _learn(settings):
    return learn(LearnParams(learner="digits", workspace=str(settings.workspace), show_progress=False, gate=LENIENT))


def _ledger(settings):
    engine = migrated_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        learner = find_learner(session, "digits")
        rows = [(i.task_index, i.status) for i in increments(session, learner)]
        classes = list(session.scalars(select(LearnedClass.name)))
    engine.dispose()
    return rows, classes


def test_connections_dropped_while_idle_are_replaced_and_the_run_goes_on(pg_workspace, prefect_server, monkeypatch):
    settings, database = pg_workspace
    original = Method.learn
    terminated = []

    def learn_after_a_restart(self, task, engine):
        terminated.append(_terminate(database))  # the ledger's and MLflow's pooled connections
        return original(self, task, engine)

    monkeypatch.setattr(Method, "learn", learn_after_a_restart)
    result = _learn(settings)

    assert terminated and terminated[0] >= 1
    assert [item["promoted"] for item in result["learned"]] == [True]
    assert _ledger(settings) == ([(0, "succeeded")], ["0", "1"])
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    assert str(client.get_model_version_by_alias("strata-digits", "champion").version) == "1"


def test_a_connection_lost_inside_the_ledger_commit_fails_clearly_and_writes_nothing(pg_workspace, prefect_server):
    """The backend dies between the increment's first class row and its commit: the database rolls the
    whole increment back, the run fails naming the cause, and the next ``learn`` records it."""
    settings, _ = pg_workspace
    fired = []

    def terminate_mid_transaction(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO classes") and not fired:
            fired.append(_terminate("", cursor.connection.info.backend_pid))

    event.listen(Engine, "before_cursor_execute", terminate_mid_transaction)
    try:
        with pytest.raises(LedgerError, match="lost the connection to the ledger database .*run the command again"):
            _learn(settings)
    finally:
        event.remove(Engine, "before_cursor_execute", terminate_mid_transaction)

    assert fired == [1]
    rows, classes = _ledger(settings)
    assert rows == [(0, "failed")] and classes == []  # no class rows of a half-recorded increment
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    assert "champion" not in client.get_registered_model("strata-digits").aliases

    _learn(settings)
    assert _ledger(settings) == ([(0, "succeeded")], ["0", "1"])
    (version,) = client.search_model_versions("name = 'strata-digits'")  # the unrecorded one was removed
    assert client.get_registered_model("strata-digits").aliases == {"champion": int(version.version),
                                                                      "candidate": int(version.version)}


def test_ledger_sessions_outside_learn_report_a_lost_connection_the_same_way(pg_workspace):
    settings, _ = pg_workspace
    engine = migrated_engine(settings.ledger_url)
    try:
        with pytest.raises(LedgerError, match="postgres@127.0.0.1:5432/.*terminating connection"):
            with ledger_session(engine) as session:
                session.execute(text("SELECT 1"))
                _terminate("", session.connection().connection.dbapi_connection.info.backend_pid)
                session.execute(text("SELECT 1"))
    finally:
        engine.dispose()
