"""The workspace's MLflow SQL store as Strata rewrites it, outside MLflow's API (which has no call for either):
the workspace id tag on each learner experiment, and the absolute artifact locations MLflow keeps, moved from an
old root to a new one when the workspace moves or is copied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

from strata.tasks.workspace.settings import StrataSettings

ID_TAG = "strata.workspace_id"  # on each MLflow experiment of the workspace
LEARNER_TAG = "strata.learner"  # marks a learner's experiment (benchmarks have their own, untagged)
# MLflow's columns that hold absolute artifact locations (file URIs or paths); dataset sources are JSON
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("datasets", "dataset_source"),
)


def mlflow_engine(uri: str) -> Engine:
    return create_engine(uri, connect_args={"timeout": 30}) if uri.startswith("sqlite") else create_engine(uri)


def tag_experiments(settings: StrataSettings, experiments: dict[str, str | None], workspace_id: str) -> None:
    """Tag the ``experiments`` (id → workspace tag) that have no workspace id yet (made before workspace ids)."""
    untagged = [experiment for experiment, tag in experiments.items() if tag is None]
    if not untagged:
        return
    with _mlflow_transaction(settings) as connection:
        for experiment in untagged:
            connection.execute(
                text("INSERT INTO experiment_tags (key, value, experiment_id) VALUES (:key, :value, :experiment)"),
                {"key": ID_TAG, "value": workspace_id, "experiment": int(experiment)},
            )


def retag_experiments(settings: StrataSettings, old_id: str, new_id: str) -> None:
    with _mlflow_transaction(settings) as connection:
        connection.execute(
            text("UPDATE experiment_tags SET value = :new WHERE key = :key AND value = :old"),
            {"key": ID_TAG, "old": old_id, "new": new_id},
        )


def rewrite_locations(settings: StrataSettings, old_root: Path, new_root: Path) -> int:
    """Point every MLflow location under ``old_root`` at the same place under ``new_root``, in one transaction;
    returns how many values changed."""
    changed = 0
    with _mlflow_transaction(settings) as connection:
        tables = set(inspect(connection).get_table_names())
        for table, column in LOCATION_COLUMNS:
            if table not in tables:
                continue
            values = connection.scalars(text(f"SELECT DISTINCT {column} FROM {table} WHERE {column} IS NOT NULL"))
            for value in list(values):
                moved = _moved_value(value, old_root, new_root, json_text=column == "dataset_source")
                if moved != value:
                    connection.execute(
                        text(f"UPDATE {table} SET {column} = :new WHERE {column} = :old"), {"new": moved, "old": value}
                    )
                    changed += 1
    return changed


def _moved_value(value: str, old_root: Path, new_root: Path, json_text: bool = False) -> str:
    """``value`` with a location under ``old_root`` (file URI, plain path, or a JSON object's string values)
    moved under ``new_root``; anything else unchanged."""
    if json_text:
        try:
            source = json.loads(value)
        except json.JSONDecodeError:
            return value
        if not isinstance(source, dict):
            return value
        moved = {k: _moved_value(v, old_root, new_root) if isinstance(v, str) else v for k, v in source.items()}
        return json.dumps(moved) if moved != source else value
    for old, new in _prefixes(old_root, new_root):
        if value == old or value.startswith(old + "/"):
            return new + value[len(old) :]
    return value


def _prefixes(old_root: Path, new_root: Path) -> list[tuple[str, str]]:
    """The spellings of a root inside MLflow's locations: file URI (percent-encoded, as MLflow writes it, and
    raw), then plain path."""
    return [
        (old_root.as_uri(), new_root.as_uri()),
        (f"file://{old_root}", f"file://{new_root}"),
        (str(old_root), str(new_root)),
    ]


def foreign_roots(settings: StrataSettings) -> set[Path]:
    """Workspace roots other than this one that the embedded store's Strata experiments point into (their
    artifact root ``<root>/.strata/mlartifacts``): where a workspace from before ids was copied or moved from."""
    artifacts = Path(settings.mlflow_artifacts)
    if not artifacts.is_relative_to(settings.workspace):
        return set()
    suffix = "/" + artifacts.relative_to(settings.workspace).as_posix()
    engine = mlflow_engine(settings.mlflow_tracking_uri)
    try:
        with engine.connect() as connection:
            locations = connection.scalars(
                text(
                    "SELECT e.artifact_location FROM experiments e JOIN experiment_tags l "
                    "ON l.experiment_id = e.experiment_id AND l.key = :learner"
                ),
                {"learner": LEARNER_TAG},
            )
            roots = set()
            for location in locations:
                path = _location_path(location or "")
                if path is not None and path.as_posix().endswith(suffix):
                    roots.add(Path(path.as_posix()[: -len(suffix)]))
    finally:
        engine.dispose()
    return {root for root in roots if root != settings.workspace}


def _location_path(location: str) -> Path | None:
    if location.startswith("file:"):
        return Path(unquote(urlsplit(location).path))
    return Path(location) if location.startswith("/") else None


@contextmanager
def _mlflow_transaction(settings: StrataSettings) -> Iterator[Connection]:
    """One transaction on the workspace's MLflow SQL store; the engine lives only as long."""
    engine = mlflow_engine(settings.mlflow_tracking_uri)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()
