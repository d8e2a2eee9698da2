"""Ledger schema migrations (alembic), configured in code: no alembic.ini to find or keep in sync.

``strata db upgrade|downgrade|current`` call these; ``strata init`` upgrades a new workspace to head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import strata.migrations
from strata.tasks.ledger.store import LedgerError, LedgerUnavailableError, ledger_session, make_engine

MIGRATIONS = Path(strata.migrations.__file__).resolve().parent  # packaged with strata, editable or not
VERSION_TABLE = "strata_alembic_version"  # MLflow and Prefect use alembic's default table


def alembic_config(url: str, connection: Connection | None = None) -> Config:
    """Alembic's config for the ledger at ``url`` (or an open ``connection``, as tests use)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(url: str, revision: str = "head") -> None:
    with _revision_named(revision):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "-1") -> None:
    with _revision_named(revision):
        command.downgrade(alembic_config(url), revision)


@contextmanager
def _revision_named(revision: str) -> Iterator[None]:
    """Alembic's refusal of a revision it cannot find or move to, as the user's mistake it is."""
    try:
        yield
    except CommandError as exc:
        raise LedgerError(f"cannot migrate the ledger to {revision!r}: {exc}; see `strata db current`") from exc


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision the ledger at ``url`` is at; None for an empty (never migrated) or missing database.

    A missing SQLite file stays missing: connecting would create an empty one, and an empty ledger where a
    lost one was hides the loss from the checks that come after (``strata.tasks.workspace.identity``)."""
    database = make_url(url).database
    if make_url(url).get_backend_name() == "sqlite" and database not in (None, "", ":memory:"):
        if not Path(database).exists():
            return None
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise LedgerUnavailableError(
            f"cannot reach the ledger database ({engine.url.render_as_string()}): {reason}; start it or fix "
            "ledger_url in strata.toml (STRATA_LEDGER_URL)"
        ) from exc
    finally:
        engine.dispose()


def migrated_engine(url: str) -> Engine:
    """An engine for the ledger at ``url``, refusing a database that is not at the head revision."""
    current, head = current_revision(url), head_revision()
    if current != head:
        raise LedgerError(
            f"the ledger at {url} is at revision {current}, not {head}: run `strata init` or `strata db upgrade`"
        )
    return make_engine(url)


@contextmanager
def ledger(url: str) -> Iterator[Session]:
    """One transaction on the ledger at ``url`` (checked to be at head); the engine lives only as long."""
    engine = migrated_engine(url)
    try:
        with ledger_session(engine) as session:
            yield session
    finally:
        engine.dispose()
