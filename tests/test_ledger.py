"""The ledger: migrations up and down on SQLite and PostgreSQL, ORM == migrated schema, the learner lease."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from strata.tasks.ledger import migrate
from strata.tasks.ledger.store import (
    Base,
    LeaseHeldError,
    acquire_lease,
    get_or_create_learner,
    holder_is_dead,
    learner_lease,
    ledger_session,
    make_engine,
    process_holder,
    release_lease,
)

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LEDGER_TABLES = {"learners", "data_versions", "increments", "classes", "leases"}


def _postgres_url() -> str:
    """A fresh schema on the local PostgreSQL for this test session; skip where it is unreachable."""
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    engine = create_engine(PG_SERVER, connect_args={"connect_timeout": 3})
    try:
        with engine.begin() as connection:
            schema = f"strata_test_{uuid.uuid4().hex[:10]}"
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # any connection failure means: no server here
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 (database test) is unreachable: {type(exc).__name__}")
    finally:
        engine.dispose()
    return f"{PG_SERVER}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    url = _postgres_url()
    yield url
    schema = url.rsplit("%3D", 1)[1]
    engine = create_engine(PG_SERVER)
    with engine.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_every_migration_runs_up_and_down(ledger_url):
    script = ScriptDirectory.from_config(migrate.alembic_config(ledger_url))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert revisions and migrate.head_revision() == revisions[-1]
    for revision in revisions:
        migrate.upgrade(ledger_url, revision)
        assert migrate.current_revision(ledger_url) == revision
    assert LEDGER_TABLES <= _tables(ledger_url)
    assert "alembic_version" not in _tables(ledger_url)  # MLflow's and Prefect's table stays theirs
    for revision in reversed([None, *revisions[:-1]]):
        migrate.downgrade(ledger_url, revision or "base")
        assert migrate.current_revision(ledger_url) == revision
    assert not LEDGER_TABLES & _tables(ledger_url)
    migrate.upgrade(ledger_url)  # and up again after a full downgrade
    assert migrate.current_revision(ledger_url) == migrate.head_revision()


def test_orm_metadata_matches_the_migrated_schema(ledger_url):
    migrate.upgrade(ledger_url)
    engine = make_engine(ledger_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "version_table": migrate.VERSION_TABLE}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_lease_excludes_a_second_holder_until_release_or_expiry(ledger_url):
    migrate.upgrade(ledger_url)
    engine = make_engine(ledger_url)
    try:
        with ledger_session(engine) as session:
            learner_id = get_or_create_learner(session, "flowers").id
        acquire_lease(engine, learner_id, "run-a", timedelta(minutes=5))
        with pytest.raises(LeaseHeldError, match="run-a holds its lease"):
            acquire_lease(engine, learner_id, "run-b", timedelta(minutes=5))
        acquire_lease(engine, learner_id, "run-a", timedelta(minutes=5))  # the holder may renew
        assert release_lease(engine, learner_id, "run-a")
        with learner_lease(engine, learner_id, "run-b", timedelta(minutes=5)):
            with pytest.raises(LeaseHeldError):
                acquire_lease(engine, learner_id, "run-a", timedelta(minutes=5))
        # a holder that crashed: its lease expired, so the next run reclaims it without clean-up
        acquire_lease(engine, learner_id, "crashed", timedelta(seconds=-1))
        acquire_lease(engine, learner_id, "run-c", timedelta(minutes=5))
        assert not release_lease(engine, learner_id, "crashed")
        assert release_lease(engine, learner_id, "run-c")
    finally:
        engine.dispose()


def test_a_dead_holder_on_this_host_loses_its_lease_and_no_one_else_does(ledger_url):
    """A ``kill -9`` leaves the lease for hours; a holder whose process is gone is taken over at once."""
    migrate.upgrade(ledger_url)
    engine = make_engine(ledger_url)
    finished = subprocess.Popen(["true"])
    finished.wait()
    host = socket.gethostname()
    try:
        with ledger_session(engine) as session:
            learner_id = get_or_create_learner(session, "flowers").id
        for alive in (f"{host}:{os.getppid()}:run", f"another-{host}:{finished.pid}:run", "no-pid-here"):
            acquire_lease(engine, learner_id, alive, timedelta(minutes=5))
            assert not holder_is_dead(alive)
            with pytest.raises(LeaseHeldError, match="holds its lease"):
                acquire_lease(engine, learner_id, process_holder("next"), timedelta(minutes=5))
            assert release_lease(engine, learner_id, alive)
        dead = f"{host}:{finished.pid}:run"
        assert holder_is_dead(dead)
        acquire_lease(engine, learner_id, dead, timedelta(minutes=5))
        acquire_lease(engine, learner_id, process_holder("next"), timedelta(minutes=5))
        assert not release_lease(engine, learner_id, dead)
        assert release_lease(engine, learner_id, process_holder("next"))
    finally:
        engine.dispose()
