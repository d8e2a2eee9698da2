"""Alembic environment for the Strata ledger, configured in code (see tasks.migrations).

Strata's version table is ``strata_alembic_version`` because MLflow and Prefect keep alembic's default
one, possibly in the same database. SQLite alters tables in batch mode (copy and move).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from strata.tasks.ledger.store import Base, make_engine

VERSION_TABLE = "strata_alembic_version"


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise SystemExit("Strata's ledger migrations need the ledger's URL, which strata db upgrade passes")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            run_with(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Strata's ledger migrations run online only: strata db upgrade")
run_online()
