"""Eight writer processes on the ledger and MLflow at once, on SQLite and on PostgreSQL: no write lost, no error.

Each case starts on an empty MLflow database, so the writers also create MLflow's store together, as
the first ``learn`` runs of a new workspace do. How fast they write is the benchmark's business
(``benchmarks/concurrent_writers.py``); here only what was stored and what went wrong is asserted.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

from benchmarks import concurrent_writers
from tests.conftest import scratch_postgres_database

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_eight_concurrent_writers_lose_nothing_and_meet_no_error(backend, capsys):
    with ExitStack() as stack:
        stores = []
        if backend == "postgresql":
            ledger = stack.enter_context(scratch_postgres_database("strata_writers_ledger"))
            tracking = stack.enter_context(scratch_postgres_database("strata_writers_mlflow"))
            stores = ["--ledger-url", f"{SERVER}/{ledger}", "--tracking-uri", f"{SERVER}/{tracking}"]
        document = concurrent_writers.main(["--backend", backend, "--writers", "8", "--rounds", "1", *stores])

    assert json.loads(capsys.readouterr().out)["backend"] == backend
    assert document["errors"] == []
    assert document["logged"] == []  # warnings and errors the writers logged: what a user would see
    mismatched = {
        f"{store}.{name}": figures
        for store, counts in document["counts"].items()
        for name, figures in counts.items()
        if figures["found"] != figures["expected"]
    }
    assert mismatched == {}
    assert document["counts"]["mlflow"]["model_versions"]["found"] == 8
    assert document["lost_writes"] == 0
