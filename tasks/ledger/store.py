"""The ledger: what each learner has learned from which data, in SQL (SQLite embedded, PostgreSQL at scale).

The schema is owned by the alembic migrations in ``migrations/``; this module's ORM metadata must
agree with them (a test compares the two). Times are naive UTC so that SQLite and PostgreSQL
compare them the same way.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker, validates

from strata.models.errors import UnavailableError, UserError

logger = logging.getLogger(__name__)
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class LedgerError(UserError, RuntimeError):
    """The ledger refuses an operation; the message says what is in the way."""


class LedgerUnavailableError(UnavailableError, LedgerError):
    """The ledger database cannot be reached, or lost the connection mid-transaction (rolled back)."""


class LearnerNameError(LedgerError, ValueError):
    """A learner name that could not safely name folders, MLflow models and Prefect deployments."""


LEARNER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def check_learner_name(name: str) -> str:
    """``name`` if it is safe as one path component and in MLflow and Prefect names, else LearnerNameError."""
    if not re.fullmatch(LEARNER_NAME, name):
        raise LearnerNameError(
            f"learner name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit (it names folders, MLflow models and deployments)"
        )
    return name


class LeaseHeldError(LedgerError):
    """Another process holds the learner's lease: two increments of one learner never overlap."""


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Learner(Base):
    """A model that learns class-incrementally; method and backbone are fixed when it first learns."""

    __tablename__ = "learners"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    method: Mapped[str | None] = mapped_column(String(64))
    method_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    backbone: Mapped[str | None] = mapped_column(String(256))
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    data_versions: Mapped[list[DataVersion]] = relationship(back_populates="learner", order_by="DataVersion.id")

    @validates("name")
    def _safe_name(self, _key: str, name: str) -> str:
        return check_learner_name(name)


class DataVersion(Base):
    """One ingested batch: immutable, addressed by its DVC md5 and the git rev of its ``.dvc`` file."""

    __tablename__ = "data_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(64), unique=True)
    learner_id: Mapped[int] = mapped_column(ForeignKey("learners.id"), index=True)
    path: Mapped[str] = mapped_column(String(512))
    classes: Mapped[dict[str, dict[str, int]]] = mapped_column(JSON)  # name -> {"train": n, "test": m}
    split: Mapped[dict[str, Any]] = mapped_column(JSON)  # how train/test were formed (given or seeded)
    md5: Mapped[str] = mapped_column(String(64))
    hash_name: Mapped[str] = mapped_column(String(32))  # DVC 2 and 3 hash differently: keep the name
    git_rev: Mapped[str] = mapped_column(String(64))
    remote: Mapped[str] = mapped_column(String(1024))
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    learner: Mapped[Learner] = relationship(back_populates="data_versions")


class Increment(Base):
    """One task learned by a learner; a crashed one stays visible as ``failed`` and can be retried."""

    __tablename__ = "increments"
    __table_args__ = (UniqueConstraint("learner_id", "task_index", name="uq_increments_learner_task"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    learner_id: Mapped[int] = mapped_column(ForeignKey("learners.id"))
    task_index: Mapped[int] = mapped_column(Integer)
    data_version_id: Mapped[int] = mapped_column(ForeignKey("data_versions.id"))
    status: Mapped[str] = mapped_column(String(16))  # running | failed | succeeded
    checkpoint_uri: Mapped[str | None] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    attempt_run_id: Mapped[str | None] = mapped_column(String(64))  # the MLflow run this attempt recorded first
    started: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished: Mapped[datetime | None] = mapped_column(DateTime)


class WorkspaceRow(Base):
    """The id of the workspace that owns this ledger (one row): a copied or foreign ledger is told apart by it."""

    __tablename__ = "workspace"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class LearnedClass(Base):
    """A learner-global class id, its name, and the task that introduced it."""

    __tablename__ = "classes"
    __table_args__ = (
        UniqueConstraint("learner_id", "class_id", name="uq_classes_learner_class_id"),
        UniqueConstraint("learner_id", "name", name="uq_classes_learner_name"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    learner_id: Mapped[int] = mapped_column(ForeignKey("learners.id"))
    class_id: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    first_task: Mapped[int] = mapped_column(Integer)


class Promotion(Base):
    """Every move of the ``champion`` alias, by the gate or by hand (promote/rollback)."""

    __tablename__ = "promotions"
    id: Mapped[int] = mapped_column(primary_key=True)
    learner_id: Mapped[int] = mapped_column(ForeignKey("learners.id"), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    previous_version: Mapped[str | None] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(16))  # gate | promote | rollback
    reason: Mapped[str] = mapped_column(String(1024))
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Lease(Base):
    """The learner's lock: one row per learner, taken by insert, reclaimed once expired."""

    __tablename__ = "leases"
    learner_id: Mapped[int] = mapped_column(ForeignKey("learners.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256))
    expires_at: Mapped[datetime] = mapped_column(DateTime)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets its folder, a busy timeout and enforced foreign keys."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


@contextmanager
def ledger_session(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error.

    A connection that dies in the middle (database restarted, backend terminated) becomes a
    LedgerError: the database rolls the open transaction back, so nothing half-written remains, and
    every Strata step is safe to run again. A connection that died while idle in the pool never gets
    here: the engine's pre-ping replaces it.
    """
    try:
        with sessionmaker(engine, expire_on_commit=False)() as session, session.begin():
            yield session
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise LedgerUnavailableError(
            f"lost the connection to the ledger database ({engine.url.render_as_string()}): "
            f"{reason}. Its open transaction was rolled back; run the command again once the "
            f"database is reachable."
        ) from exc


def get_or_create_learner(session: Session, name: str) -> Learner:
    learner = session.scalar(select(Learner).where(Learner.name == name))
    if learner is None:
        learner = Learner(name=name, method_config={})
        session.add(learner)
        session.flush()
    return learner


def find_learner(session: Session, name: str) -> Learner | None:
    return session.scalar(select(Learner).where(Learner.name == name))


def known_classes(session: Session, learner: Learner) -> set[str]:
    """Classes the learner has learned or has pending in ingested data versions."""
    learned = set(session.scalars(select(LearnedClass.name).where(LearnedClass.learner_id == learner.id)))
    for version in learner.data_versions:
        learned.update(version.classes)
    return learned


def find_data_version(session: Session, batch_id: str) -> DataVersion | None:
    return session.scalar(select(DataVersion).where(DataVersion.batch_id == batch_id))


def list_data_versions(session: Session, learner: str | None = None) -> list[DataVersion]:
    query = select(DataVersion).join(Learner).order_by(DataVersion.id)
    if learner is not None:
        query = query.where(Learner.name == learner)
    return list(session.scalars(query))


def process_holder(run: str) -> str:
    """This process as a lease holder, ``host:pid:run``: enough to tell later whether it is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{run}"


def holder_is_dead(holder: str) -> bool:
    """True only for a holder on this host whose process is gone (killed, crashed, machine restarted).

    Anything else (another host, an unparseable holder, a live or foreign process) counts as alive: a
    lease is never reclaimed early on a guess. Hosts sharing a ledger must have distinct hostnames.
    """
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire_lease(engine: Engine, learner_id: int, holder: str, ttl: timedelta) -> datetime:
    """Take the learner's lease for ``ttl`` or raise LeaseHeldError; returns its expiry.

    Insert, or take over the row by compare-and-swap on (holder, expiry), so the database decides who
    wins on both SQLite and PostgreSQL. The row is taken over when it expired, when it is this holder's
    (re-acquiring extends it) or when its holder is a dead process on this host (a ``kill -9`` does not
    have to wait for the expiry).
    """
    for _ in range(3):  # the row may be released between the failed insert and the read
        now = utcnow()
        expires = now + ttl
        try:
            with engine.begin() as connection:
                connection.execute(insert(Lease).values(learner_id=learner_id, holder=holder, expires_at=expires))
            return expires
        except IntegrityError:
            pass
        with engine.begin() as connection:
            current = connection.execute(
                select(Lease.holder, Lease.expires_at).where(Lease.learner_id == learner_id)
            ).one_or_none()
            if current is None:
                continue
            if current.expires_at < now or current.holder == holder or holder_is_dead(current.holder):
                taken = connection.execute(
                    update(Lease)
                    .where(
                        Lease.learner_id == learner_id,
                        Lease.holder == current.holder,
                        Lease.expires_at == current.expires_at,
                    )
                    .values(holder=holder, expires_at=expires)
                ).rowcount
                if taken == 1:
                    if current.holder != holder:
                        logger.warning(
                            "took over the lease of learner %s from %s (%s)",
                            learner_id,
                            current.holder,
                            "expired" if current.expires_at < now else "its process is gone",
                        )
                    return expires
                continue
        raise LeaseHeldError(
            f"learner {learner_id} is busy: {current.holder} holds its lease until "
            f"{current.expires_at:%Y-%m-%d %H:%M:%S} UTC"
        )
    raise LeaseHeldError(f"learner {learner_id}: its lease changed hands three times while acquiring it; try again")


def release_lease(engine: Engine, learner_id: int, holder: str) -> bool:
    """Give the lease back; False if this holder no longer had it (it expired and was reclaimed)."""
    with engine.begin() as connection:
        return (
            connection.execute(delete(Lease).where(Lease.learner_id == learner_id, Lease.holder == holder)).rowcount
            == 1
        )


@contextmanager
def learner_lease(engine: Engine, learner_id: int, holder: str, ttl: timedelta) -> Iterator[datetime]:
    """Hold the learner's lease for the duration of the block."""
    expires = acquire_lease(engine, learner_id, holder, ttl)
    try:
        yield expires
    finally:
        release_lease(engine, learner_id, holder)
