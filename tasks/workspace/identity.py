"""Which workspace the stores belong to, and whether they are intact: checked before a command uses them.

A workspace has an id (uuid4). The ledger holds it (table ``workspace``), so does each of its MLflow
experiments (tag ``strata.workspace_id``), and ``.strata/workspace.json`` holds it with the root the
workspace was last used at. That file is never tracked by git: a ``git clone`` is not a copy of the stores,
a ``cp -a`` or ``mv`` of the folder is, and the recorded root tells the two apart on first use at a new root:

* the recorded root still holds a workspace with this id → this is a **copy**: it becomes a new workspace
  (new id in its ledger, its experiments' tags and ``workspace.json``) and its MLflow store's locations are
  rewritten to point into the copy, so it never reads or writes the original;
* it does not → the workspace was **moved**: the new root is recorded and the MLflow locations follow it.

MLflow keeps absolute artifact locations (an experiment's, each run's, logged model's and registered
version's, and a dataset input's source) whatever it is given; that is the only absolute path into the
workspace a store keeps, and it is rewritten (``mlflow_store.rewrite_locations``), in one transaction, whenever
the root changes.
A store outside the workspace (a tracking server, a PostgreSQL database) is shared by a copy: it cannot be
made independent, and first use of the copy says so and how to give it its own.

Before any of that, the stores are checked to be intact: present, non-empty, a readable schema at a known
revision, and this workspace's. A ledger at an older revision is migrated on first use. Anything else stops
the command with one line naming the file, what is wrong and the fix (never a fresh empty store in its
place): MLflow would silently create an empty store over a 0-byte ``mlflow.db``, and the learn after it would
register "version 1" and promote it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from filelock import FileLock
from sqlalchemy import delete, func, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from strata.models.errors import UnavailableError, UserError
from strata.tasks.ledger import migrate
from strata.tasks.ledger.store import Increment, LedgerUnavailableError, WorkspaceRow, make_engine, utcnow
from strata.tasks.workspace.mlflow_store import (
    ID_TAG,
    LEARNER_TAG,
    foreign_roots,
    mlflow_engine,
    retag_experiments,
    rewrite_locations,
    tag_experiments,
)
from strata.tasks.workspace.settings import StrataSettings, redact_url

logger = logging.getLogger(__name__)

IDENTITY_FILE = "workspace.json"  # in .strata/: {"id": ..., "root": ...}; untracked, copied with the folder
IDENTITY_SHOWN = f".strata/{IDENTITY_FILE}"
STORE_LOCK = "mlflow-store.lock"  # in .strata/: held while a store is created, migrated or rewritten
STORE_LOCK_TIMEOUT_S = 600  # creating a store runs MLflow's whole migration history: seconds, on a busy disk more
SERVER_SCHEMES = ("http://", "https://", "databricks")  # MLflow stores behind a tracking server
INGESTED = "data/batches/*.dvc"  # the .dvc file of each ingested batch (strata.tasks.data.ingest.BATCHES)
SQLITE_HEADER = b"SQLite format 3\x00"
NOT_A_STORE = ("is not an SQLite database", "cannot be read")  # a file MLflow would fail on, or write over


class StoreError(UserError):
    """A store is missing, empty, unreadable or another workspace's; the message names it, says what is wrong
    and the fix."""


class StoreUnavailableError(UnavailableError, StoreError):
    """A store's database cannot be reached; nothing was read or written."""


@dataclass(frozen=True)
class WorkspaceIdentity:
    """This workspace's id, its root, and what first use here found (``""``: nothing new)."""

    id: str
    root: Path
    change: str = ""  # "" | "moved" | "copied"


@dataclass
class _Ledger:
    """What the ledger holds that identity needs: its revision, workspace id and learned increments."""

    where: str  # the file relative to the workspace, or the redacted URL
    revision: str | None = None
    workspace_id: str | None = None
    learned: int = 0
    missing: str = ""  # why there is no ledger to read ("is missing", "is empty (0 bytes)"); "" when read


@dataclass
class _MlflowStore:
    """What the MLflow store holds that identity needs; ``kind`` is ``server``, ``sql`` or ``other``."""

    where: str
    kind: str
    owned: bool = False  # an SQLite file inside the workspace: copied and moved with it
    missing: str = ""  # "is missing", "is empty (0 bytes)", "holds no MLflow tables"; "" when read
    experiments: dict[str, str | None] = field(default_factory=dict)  # experiment id -> workspace id tag
    runs: int = 0

    @property
    def readable(self) -> bool:
        """An SQL store that exists and holds MLflow's tables: one this module can read and rewrite."""
        return self.kind == "sql" and not self.missing


def open_workspace(settings: StrataSettings) -> WorkspaceIdentity:
    """Check the workspace's stores and return its identity, first recording a move or separating a copy.

    Cheap when nothing changed (a few small SQL reads, no lock); the writes of a first use, a move or a
    copy happen once, under the store lock, after reading everything again.
    """
    identity = _open(settings, require_ledger=True)
    assert identity is not None  # _open raises for a missing ledger when one is required
    return identity


def open_mlflow_store(settings: StrataSettings) -> WorkspaceIdentity | None:
    """``open_workspace`` for a command that needs only the MLflow store (``compare`` logs to the one of any
    folder): without a ledger there is no identity to check (None), but a store that lost what a ledger
    records, or runs a lost ledger recorded, are still refused."""
    return _open(settings, require_ledger=False)


def _open(settings: StrataSettings, require_ledger: bool) -> WorkspaceIdentity | None:
    ledger, store = _read_ledger(settings), _read_mlflow(settings)
    if not require_ledger and (ledger.missing or ledger.revision is None):
        if ledger.missing:
            _refuse_lost_ledger(settings, ledger, store)
        return None
    _check_intact(settings, ledger, store)
    recorded = _read_identity(settings)
    if (
        recorded is not None
        and recorded.root == settings.workspace
        and ledger.revision == _head()
        and ledger.workspace_id == recorded.id
        and _owned_tags_are(store, recorded.id)
    ):
        return recorded
    with store_lock(settings):
        return _settle(settings)


def check_stores(settings: StrataSettings) -> None:
    """The checks of ``open_workspace`` without its writes (no migration, id, move or copy): StoreError for a
    store that is lost, unreadable or another workspace's. ``strata doctor`` reports through it."""
    ledger, store = _read_ledger(settings), _read_mlflow(settings)
    _check_intact(settings, ledger, store)
    recorded = _read_identity(settings)
    if workspace_id := recorded.id if recorded else ledger.workspace_id:
        _check_ownership(ledger, store, workspace_id)


def store_lock(settings: StrataSettings) -> FileLock:
    """The workspace's store lock: held while an MLflow store is created, or a store migrated or rewritten."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(settings.state_dir / STORE_LOCK, timeout=STORE_LOCK_TIMEOUT_S)


def refuse_a_lost_ledger(settings: StrataSettings) -> None:
    """StoreError when the ledger file is lost (missing, empty, not SQLite) while the MLflow store or git holds
    what it recorded: a new empty ledger there would disown them (``strata init`` and ``strata db upgrade`` call
    this before creating one). A database that is there without a schema (``strata db downgrade base``) is
    the user's to upgrade."""
    ledger = _read_ledger(settings)
    if ledger.missing:
        _refuse_lost_ledger(settings, ledger, _read_mlflow(settings))


def _settle(settings: StrataSettings) -> WorkspaceIdentity:
    """Under the store lock: migrate an older ledger, then record a new id, a move or a copy."""
    ledger = _read_ledger(settings)
    if ledger.revision != _head():
        _migrate_ledger(settings, ledger)
        ledger = _read_ledger(settings)
    store = _read_mlflow(settings)
    _check_intact(settings, ledger, store)
    recorded = _read_identity(settings)
    root = settings.workspace
    if recorded is None:
        identity = _first_use(settings, ledger, store)
    else:
        _check_ownership(ledger, store, recorded.id)
        if recorded.root == root:
            identity = WorkspaceIdentity(recorded.id, root)
        elif _holds_workspace(recorded.root, recorded.id, root):
            identity = _separate_copy(settings, ledger, store, recorded)
        else:
            identity = _record_move(settings, store, recorded)
    if ledger.workspace_id is None:
        _write_ledger_id(settings, identity.id)
    tag_experiments(settings, store.experiments if store.owned else {}, identity.id)
    _write_identity(settings, identity)
    return identity


def _first_use(settings: StrataSettings, ledger: _Ledger, store: _MlflowStore) -> WorkspaceIdentity:
    """No ``workspace.json`` yet: a new workspace, one from before workspace ids, or one whose file was lost.

    The id is the ledger's when it has one (a git clone sharing a ledger server is the same workspace), else
    new. An embedded MLflow store whose default artifact root lies under another folder came with the
    workspace from there: its locations are made to point here.
    """
    tags = {tag for tag in store.experiments.values() if tag}
    workspace_id = ledger.workspace_id or (tags.pop() if store.owned and len(tags) == 1 else str(uuid.uuid4()))
    _check_ownership(ledger, store, workspace_id)
    if store.owned and store.readable:
        for old_root in foreign_roots(settings):
            moved = rewrite_locations(settings, old_root, settings.workspace)
            logger.info("workspace %s: %d MLflow locations moved from %s into it", settings.workspace, moved, old_root)
    if ledger.workspace_id is None and (ledger.learned or store.runs):
        logger.info("workspace %s had no id yet: it is now workspace %s", settings.workspace, workspace_id)
    return WorkspaceIdentity(workspace_id, settings.workspace)


def _record_move(settings: StrataSettings, store: _MlflowStore, recorded: WorkspaceIdentity) -> WorkspaceIdentity:
    """The recorded root no longer holds this workspace: it moved here, and the MLflow locations follow it."""
    moved = rewrite_locations(settings, recorded.root, settings.workspace) if store.readable else 0
    logger.info(
        "workspace %s moved from %s to %s: %d MLflow locations now point into it",
        recorded.id,
        recorded.root,
        settings.workspace,
        moved,
    )
    return WorkspaceIdentity(recorded.id, settings.workspace, "moved")


def _separate_copy(
    settings: StrataSettings, ledger: _Ledger, store: _MlflowStore, recorded: WorkspaceIdentity
) -> WorkspaceIdentity:
    """The recorded root still holds this workspace: this is a copy, made a workspace of its own.

    Its embedded stores get a new id and the MLflow locations are rewritten into the copy; a store outside
    the workspace is the original's too, which is said once, with how to separate it. A shared ledger keeps
    the id: the two folders are then one workspace to it.
    """
    root, original = settings.workspace, recorded.root
    ledger_owned = _inside(settings, sqlite_file(settings.ledger_url))
    new_id = str(uuid.uuid4()) if ledger_owned else recorded.id
    if not ledger_owned:
        logger.warning(
            "%s is a copy of the workspace at %s and shares its ledger %s: both record into it as one workspace; "
            "to separate them, point the copy's ledger_url in strata.toml at a database of its own",
            root,
            original,
            ledger.where,
        )
    if store.owned:
        moved = 0
        if store.readable:
            moved = rewrite_locations(settings, original, root)
            retag_experiments(settings, recorded.id, new_id)
    else:
        moved = 0
        logger.warning(
            "%s is a copy of the workspace at %s and shares its MLflow store %s: runs and registered versions of "
            "learners with the same name mix; to separate them, point the copy's mlflow_tracking_uri in strata.toml at "
            "a store of its own",
            root,
            original,
            store.where,
        )
    if ledger_owned:
        _write_ledger_id(settings, new_id, replacing=recorded.id)
    logger.info(
        "workspace %s is a copy of workspace %s at %s: it is now workspace %s; %d MLflow locations point into it",
        root,
        recorded.id,
        original,
        new_id,
        moved,
    )
    return WorkspaceIdentity(new_id, root, "copied")


def _check_intact(settings: StrataSettings, ledger: _Ledger, store: _MlflowStore) -> None:
    """Refuse a lost or schema-less ledger, and an MLflow store that lost what the ledger recorded."""
    if ledger.missing:
        _refuse_lost_ledger(settings, ledger, store)
        raise StoreError(f"the ledger {ledger.where} {ledger.missing}: run `strata init` to create it")
    if ledger.revision is None:
        rebuild = ", then `strata doctor --repair` to rebuild its rows" if _held(settings, store) else ""
        raise StoreError(
            f"the ledger {ledger.where} holds no Strata schema (revision None, head {_head()}): run `strata db "
            f"upgrade`{rebuild or ' (or `strata init`)'}"
        )
    if ledger.revision not in _known_revisions():
        raise StoreError(
            f"the ledger {ledger.where} is at revision {ledger.revision}, which this Strata does not know (head "
            f"{_head()}): a newer Strata migrated it; upgrade Strata (`pip install -U strata-cil`)"
        )
    if store.missing and ledger.learned:
        raise StoreError(
            f"the MLflow store {store.where} {store.missing} but the ledger records {ledger.learned} learned "
            f"increments: restore {store.where} from a backup (Strata never starts an empty store in its place); "
            "`strata doctor` shows what is affected"
        )
    if store.missing.startswith(NOT_A_STORE):
        raise StoreError(
            f"the MLflow store {store.where} {store.missing}: restore it from a backup, or move it aside if it is "
            "not yours to keep (Strata never writes a new store over a file); `strata doctor` shows what is affected"
        )


def _refuse_lost_ledger(settings: StrataSettings, ledger: _Ledger, store: _MlflowStore) -> None:
    """StoreError when a lost ledger had recorded something that survives elsewhere."""
    if held := _held(settings, store):
        raise StoreError(
            f"the ledger {ledger.where} {ledger.missing}, but {held}: run `strata doctor --repair` to rebuild the "
            "ledger from git, DVC and MLflow (a new empty ledger would disown them)"
        )


def _held(settings: StrataSettings, store: _MlflowStore) -> str:
    """What survives of a ledger's records in the other stores ("" for nothing): learner runs, ingested batches."""
    held = [f"the MLflow store {store.where} holds {store.runs} runs of this workspace"] if store.runs else []
    if batches := len(list(settings.workspace.glob(INGESTED))):
        held.append(f"git holds {batches} ingested data versions ({INGESTED})")
    return " and ".join(held)


def _check_ownership(ledger: _Ledger, store: _MlflowStore, workspace_id: str) -> None:
    """Refuse a ledger, or an embedded MLflow store, that carries another workspace's id."""
    if ledger.workspace_id not in (None, workspace_id):
        raise StoreError(
            f"the ledger {ledger.where} belongs to workspace {ledger.workspace_id}, not to this workspace "
            f"{workspace_id} ({IDENTITY_SHOWN}): it was copied in from another workspace; put this "
            "workspace's own ledger back (from a backup), or move it aside and run `strata doctor --repair` to "
            "rebuild it from git, DVC and MLflow"
        )
    foreign = sorted({tag for tag in store.experiments.values() if tag and tag != workspace_id}) if store.owned else []
    if foreign:
        raise StoreError(
            f"the MLflow store {store.where} belongs to workspace {', '.join(foreign)}, not to this workspace "
            f"{workspace_id} ({IDENTITY_SHOWN}): it was copied in from another workspace; put this "
            "workspace's own store back (from a backup); `strata doctor` shows what is affected"
        )


def _owned_tags_are(store: _MlflowStore, workspace_id: str) -> bool:
    return not store.owned or all(tag == workspace_id for tag in store.experiments.values())


# --- the ledger ---------------------------------------------------------------------------------------------


def _read_ledger(settings: StrataSettings) -> _Ledger:
    url = settings.ledger_url
    path = sqlite_file(url)
    ledger = _Ledger(where=_shown(settings, path, url))
    if path is not None and (missing := _sqlite_missing(path)):
        ledger.missing = missing
        return ledger
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": migrate.VERSION_TABLE})
            ledger.revision = context.get_current_revision()
            tables = set(inspect(connection).get_table_names())
            if "workspace" in tables:
                ids = list(connection.scalars(select(WorkspaceRow.id)))
                if len(ids) > 1:
                    raise StoreError(
                        f"the ledger {ledger.where} names {len(ids)} workspaces ({', '.join(ids)}) in its "
                        "workspace table, which holds one: `strata doctor` shows what is affected"
                    )
                ledger.workspace_id = ids[0] if ids else None
            if "increments" in tables:
                ledger.learned = (
                    connection.scalar(
                        select(func.count()).select_from(Increment).where(Increment.status == "succeeded")
                    )
                    or 0
                )
    except DBAPIError as exc:
        names = ("the ledger database", "the ledger")
        raise _failure(exc, path, names, ledger.where, "ledger_url", LedgerUnavailableError) from exc
    finally:
        engine.dispose()
    return ledger


def _migrate_ledger(settings: StrataSettings, ledger: _Ledger) -> None:
    """An existing ledger at an older revision is migrated on first use (what `strata db upgrade` does)."""
    migrate.upgrade(settings.ledger_url)
    logger.info("migrated the ledger %s from revision %s to %s", ledger.where, ledger.revision, _head())


def _write_ledger_id(settings: StrataSettings, workspace_id: str, replacing: str | None = None) -> None:
    engine = make_engine(settings.ledger_url)
    try:
        with engine.begin() as connection:
            if replacing is not None:
                connection.execute(delete(WorkspaceRow).where(WorkspaceRow.id == replacing))
            connection.execute(insert(WorkspaceRow).values(id=workspace_id, created=utcnow()))
    finally:
        engine.dispose()


@cache
def _head() -> str | None:
    return migrate.head_revision()  # parsed from the migration scripts: once per process


@cache
def _known_revisions() -> frozenset[str]:
    scripts = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    return frozenset(revision.revision for revision in scripts.walk_revisions())


# --- the MLflow store ---------------------------------------------------------------------------------------


def _read_mlflow(settings: StrataSettings) -> _MlflowStore:
    uri = settings.mlflow_tracking_uri
    if uri.startswith(SERVER_SCHEMES):
        return _MlflowStore(where=redact_url(uri), kind="server")
    if "://" not in uri or uri.startswith("file:"):
        return _MlflowStore(where=uri, kind="other")  # MLflow's deprecated file store: nothing to check here
    path = sqlite_file(uri)
    store = _MlflowStore(where=_shown(settings, path, uri), kind="sql", owned=_inside(settings, path))
    if path is not None and (missing := _sqlite_missing(path)):
        store.missing = missing
        return store
    engine = mlflow_engine(uri)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("experiments"):
                store.missing = "holds no MLflow tables"
                return store
            rows = connection.execute(
                text(
                    "SELECT e.experiment_id, t.value FROM experiments e "
                    "JOIN experiment_tags l ON l.experiment_id = e.experiment_id AND l.key = :learner "
                    "LEFT JOIN experiment_tags t ON t.experiment_id = e.experiment_id AND t.key = :tag"
                ),
                {"learner": LEARNER_TAG, "tag": ID_TAG},
            )
            store.experiments = {str(experiment): tag for experiment, tag in rows}
            if store.experiments:
                store.runs = connection.scalar(
                    text(
                        "SELECT count(*) FROM runs r JOIN experiment_tags l ON l.experiment_id = r.experiment_id "
                        "AND l.key = :learner"
                    ),
                    {"learner": LEARNER_TAG},
                )
    except DBAPIError as exc:
        names = ("the MLflow store", "the MLflow store")
        raise _failure(exc, path, names, store.where, "mlflow_tracking_uri", StoreUnavailableError) from exc
    finally:
        engine.dispose()
    return store


# --- workspace.json -----------------------------------------------------------------------------------------


def _read_identity(settings: StrataSettings) -> WorkspaceIdentity | None:
    path = settings.state_dir / IDENTITY_FILE
    try:
        recorded = json.loads(path.read_text())
        return WorkspaceIdentity(str(recorded["id"]), Path(recorded["root"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"{IDENTITY_SHOWN} cannot be read ({exc}): remove it; the next command finds the "
            "workspace's id in its ledger again"
        ) from exc


def _write_identity(settings: StrataSettings, identity: WorkspaceIdentity) -> None:
    path = settings.state_dir / IDENTITY_FILE
    if _read_identity(settings) == WorkspaceIdentity(identity.id, identity.root):
        return
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps({"id": identity.id, "root": str(identity.root)}) + "\n")
    os.replace(scratch, path)


def _holds_workspace(root: Path, workspace_id: str, here: Path) -> bool:
    """True when ``root`` (another folder than ``here``) still holds the workspace with this id: ``here`` is a
    copy of it."""
    try:
        recorded = json.loads((root / ".strata" / IDENTITY_FILE).read_text())
        if (root / ".strata").samefile(here / ".strata"):
            return False  # one folder seen through two paths (a bind mount): the same workspace, moved in name
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("id") == workspace_id


# --- files and names ----------------------------------------------------------------------------------------


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL; None for any other database (or an in-memory one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _sqlite_missing(path: Path) -> str:
    """Why ``path`` holds no database to read ("" when it does): missing, empty, or not SQLite at all."""
    try:
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not header:
        return "is empty (0 bytes)"
    if header != SQLITE_HEADER:
        return "is not an SQLite database"
    return ""


def _inside(settings: StrataSettings, path: Path | None) -> bool:
    return path is not None and path.resolve().is_relative_to(settings.workspace)


def _shown(settings: StrataSettings, path: Path | None, url: str) -> str:
    """A store as messages name it: its file relative to the workspace when inside, else the redacted URL."""
    if path is not None and _inside(settings, path):
        return path.resolve().relative_to(settings.workspace).as_posix()
    return str(path) if path is not None else redact_url(url)


def _reason(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__


def _unreachable(exc: DBAPIError) -> bool:
    """A database server that did not answer (refused, timed out, gone), as opposed to one that answered."""
    return type(exc.orig).__name__ == "OperationalError" or exc.connection_invalidated


def _failure(
    exc: DBAPIError,
    path: Path | None,
    names: tuple[str, str],
    where: str,
    setting: str,
    unavailable: type[UnavailableError],
) -> Exception:
    """A database server that did not answer (exit 3, ``names[0]``), or a store that answered but cannot be read
    (exit 2, ``names[1]``); ``setting`` is the strata.toml key that points at it."""
    if path is None and _unreachable(exc):
        return unavailable(
            f"cannot reach {names[0]} ({where}): {_reason(exc)}; start it or fix {setting} in strata.toml "
            f"(STRATA_{setting.upper()})"
        )
    return _unreadable(names[1], where, exc)


def _unreadable(what: str, where: str, exc: DBAPIError) -> StoreError:
    return StoreError(
        f"{what} {where} cannot be read ({_reason(exc)}): restore it from a backup; `strata doctor` shows what is "
        "affected"
    )
