"""Shared fixtures. Offline by design: no hub downloads, no telemetry."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing checkpoint fails at once instead of retrying
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_backbone_factory():
    """Build a fresh tiny backbone (random-init, fixed seed) per call."""
    from strata.models.backbones import build_backbone

    return lambda name="tiny": build_backbone(name)


@pytest.fixture(scope="session")
def synthetic_stream():
    """A 3-task stream of generated images (6 classes, 2 per task)."""
    from strata.models.streams import split_by_classes
    from strata.tasks.data.readers import read_dataset

    return split_by_classes(read_dataset("synthetic:6"), base=0, increment=2, order="natural")


@pytest.fixture()
def engine():
    from strata.models.engine import Engine

    return Engine("cpu", seed=0, show_progress=False)


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (temporary SQLite database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def digit_batches(tmp_path_factory):
    """scikit-learn's digits as 5 image-folder batches of 2 classes (written once per session)."""
    from strata.tasks.data.demo_batches import write_digit_batches

    return write_digit_batches(tmp_path_factory.mktemp("incoming"))


def learn_digit_batches(root: Path, batches: list[Path]) -> Path:
    """A new workspace at ``root`` whose learner ``digits`` ingested ``batches`` and learned them all through the
    learn flow, every increment promoted (a gate that passes anything)."""
    from strata.flows.learn import LearnParams, learn
    from strata.tasks.data.ingest import ingest
    from strata.tasks.tracking.promotion import GateConfig
    from strata.tasks.workspace.settings import load_settings
    from strata.tasks.workspace.setup import init_workspace

    init_workspace(root)
    settings = load_settings(root)
    for batch in batches:
        ingest(settings, batch, "digits")
    lenient = GateConfig(old_accuracy_budget=1.0, accuracy_floor=0.0)
    learn(LearnParams(learner="digits", workspace=str(root), show_progress=False, gate=lenient))
    return root


@pytest.fixture(scope="session")
def learned_digits(tmp_path_factory, digit_batches, prefect_server) -> Path:
    """The first two digit batches learned (v1, v2; champion v2), made once per session. Tests work on a copy of
    it (a copy becomes a workspace of its own on first use) and never change it."""
    return learn_digit_batches(tmp_path_factory.mktemp("learned-digits") / "ws", digit_batches[:2])


def cp_a(source: Path, target: Path):
    """``cp -a source target`` as a user copies a workspace; the copy's settings."""
    import subprocess

    from strata.tasks.workspace.settings import load_settings

    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return load_settings(target)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def scratch_postgres_database(prefix: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL at 127.0.0.1:5432, dropped afterwards; a skip saying why if none."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    try:
        admin = psycopg.connect(
            "host=127.0.0.1 port=5432 dbname=test user=postgres", autocommit=True, connect_timeout=3
        )
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc}")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
