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

from strata.flows.learn import LearnParams, learn
from strata.models.methods.base import Method
from strata.tasks.data.ingest import ingest
from strata.tasks.ledger.increments import increments
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.ledger.store import LearnedClass, LedgerError, find_learner, ledger_session, make_engine
from strata.tasks.tracking.promotion import GateConfig
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import init_workspace
from tests.conftest import scratch_postgres_database

LENIENT = GateConfig(old_accuracy_budget=1.0, accuracy_floor=0.0)
SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture()
def pg_database():
    with scratch_postgres_database("strata_loss") as database:
        yield database


@pytest.fixture()
def pg_workspace(tmp_path, monkeypatch, digit_batches, pg_database):
    """A workspace whose ledger and MLflow store are one scratch PostgreSQL database, two batches ingested."""
    url = f"{SERVER}/{pg_database}"
    monkeypatch.setenv("STRATA_LEDGER_URL", url)
    monkeypatch.setenv("STRATA_MLFLOW_TRACKING_URI", url)
    init_workspace(tmp_path / "ws")
    settings = load_settings(tmp_path / "ws")
    for batch in digit_batches[:2]:
        ingest(settings, batch, "digits")
    return settings, pg_database


def _terminate(database: str, pid: int | None = None) -> int:
    """Terminate ``pid``'s backend, or every backend on ``database`` but the caller's; returns how many."""
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=postgres", autocommit=True) as admin:
        where = "pid = %s" if pid else "datname = %s AND pid <> pg_backend_pid()"
        return len(
            admin.execute(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}", (pid or database,)
            ).fetchall()
        )


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


def test_dropped_connections_mid_learn_are_replaced_or_fail_clearly_and_the_next_learn_completes(
    pg_workspace, prefect_server, monkeypatch
):
    """Task 0: every connection on the database is terminated as training starts (a restart): the pooled ones
    are pre-pinged and replaced, and the run goes on. Task 1: the ledger's connection dies between the
    increment's first class row and its commit: the database rolls the whole increment back and the run
    fails naming the cause. The next ``learn`` records task 1 and removes the version left unrecorded."""
    settings, database = pg_workspace
    original = Method.learn
    terminated, armed, fired = [], [], []

    def learn_after_a_restart(self, task, engine):
        if task.index == 0:
            terminated.append(_terminate(database))  # the ledger's and MLflow's pooled connections
        else:
            armed.append(task.index)  # task 1's commit is the next one to write class rows
        return original(self, task, engine)

    def terminate_inside_the_commit(conn, cursor, statement, parameters, context, executemany):
        if armed and not fired and statement.startswith("INSERT INTO classes"):
            fired.append(_terminate("", cursor.connection.info.backend_pid))

    monkeypatch.setattr(Method, "learn", learn_after_a_restart)
    event.listen(Engine, "before_cursor_execute", terminate_inside_the_commit)
    try:
        with pytest.raises(LedgerError, match="lost the connection to the ledger database .*run the command again"):
            _learn(settings)
    finally:
        event.remove(Engine, "before_cursor_execute", terminate_inside_the_commit)

    assert terminated and terminated[0] >= 1 and fired == [1]
    rows, classes = _ledger(settings)
    assert rows == [(0, "succeeded"), (1, "failed")]
    assert classes == ["0", "1"]  # none of task 1's class rows
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    assert client.get_registered_model("strata-digits").aliases["champion"] == 1

    _learn(settings)
    assert _ledger(settings) == ([(0, "succeeded"), (1, "succeeded")], ["0", "1", "2", "3"])
    versions = sorted(int(v.version) for v in client.search_model_versions("name = 'strata-digits'"))
    assert versions == [1, 3]  # version 2 was registered for task 1 but never recorded: removed
    assert client.get_registered_model("strata-digits").aliases == {"champion": 3, "candidate": 3}


def test_ledger_sessions_outside_learn_report_a_lost_connection_the_same_way(pg_database):
    engine = make_engine(f"{SERVER}/{pg_database}")
    try:
        with pytest.raises(LedgerError, match="postgres@127.0.0.1:5432/.*terminating connection"):
            with ledger_session(engine) as session:
                session.execute(text("SELECT 1"))
                _terminate("", session.connection().connection.dbapi_connection.info.backend_pid)
                session.execute(text("SELECT 1"))
    finally:
        engine.dispose()
