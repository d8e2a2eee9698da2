"""Clean-up of an interrupted attempt removes only what that attempt provably made: the versions of the run it
recorded in the ledger before it registered anything. A version no attempt recorded (a lost ledger's, one made
by hand) is never deleted, and the gate does not move a champion the ledger does not know.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from prefect.settings import PREFECT_API_URL
from sqlalchemy import select
from typer.testing import CliRunner

from strata.cli.app import app
from strata.tasks.data.ingest import ingest
from strata.tasks.doctor.checks import diagnose
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.ledger.store import Increment, ledger_session
from strata.tasks.tracking.promotion import CHAMPION
from tests.test_doctor import MODEL, champion, client_of, copy_of, learn_all, registered

ROOT = Path(__file__).resolve().parents[1]
KILLPOINT = [sys.executable, str(ROOT / "tests" / "killpoint.py")]


def _attempts(settings) -> dict[int, tuple[str, str | None]]:
    engine = migrated_engine(settings.ledger_url)
    try:
        with ledger_session(engine) as session:
            return {i.task_index: (i.status, i.attempt_run_id) for i in session.scalars(select(Increment))}
    finally:
        engine.dispose()


def test_an_attempt_killed_after_registering_is_cleaned_by_the_next_and_only_its_version_goes(
    tmp_path, learned_digits, digit_batches, prefect_server
):
    settings = copy_of(learned_digits, tmp_path)
    ingest(settings, digit_batches[2], "digits")
    before = registered(settings)
    killed = subprocess.run(
        [*KILLPOINT, "strata.tasks.tracking.runs:log_and_register", "return", "--"]
        + ["learn", "--learner", "digits", "--budget", "1.0"],
        cwd=settings.workspace,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": str(PREFECT_API_URL.value())},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    orphan = {v: run for v, run in registered(settings).items() if v not in before}
    assert list(orphan) == ["3"]
    assert _attempts(settings)[2] == ("running", orphan["3"])  # recorded before it registered
    assert [(f.subject, f.problem) for f in diagnose(settings)] == [
        (f"{MODEL} v3", "registered by an interrupted attempt")
    ]

    result = learn_all(settings)

    assert [item["version"] for item in result["learned"]] == ["4"]
    after = registered(settings)
    assert set(after) == {*before, "4"}  # v3 went, every version before it stayed
    assert {v: after[v] for v in before} == before
    assert diagnose(settings) == []


def test_a_version_no_attempt_recorded_is_never_deleted_and_an_unknown_champion_stays(
    tmp_path, learned_digits, digit_batches, prefect_server
):
    """A version of task 2 that the ledger does not know (as a lost ledger's would be) is kept when task 2 is
    learned, and the gate does not promote over a champion it cannot compare with."""
    settings = copy_of(learned_digits, tmp_path)
    ingest(settings, digit_batches[2], "digits")
    client = client_of(settings)
    one = client.get_model_version(MODEL, "1")
    foreign = client.create_model_version(
        MODEL, one.source, run_id=one.run_id, tags={**one.tags, "strata.task_index": "2"}
    )
    client.set_registered_model_alias(MODEL, CHAMPION, foreign.version)

    result = learn_all(settings)

    assert [item["promoted"] for item in result["learned"]] == [False]
    assert set(registered(settings)) == {"1", "2", "3", "4"}
    assert champion(settings) == "3"


def test_the_lost_ledger_scenario_keeps_every_version_and_the_champion(
    tmp_path, learned_digits, digit_batches, prefect_server
):
    """Lose ``strata.db``, follow what Strata says, learn the next batch: nothing registered is lost."""
    settings = copy_of(learned_digits, tmp_path)
    before, champion_before = registered(settings), champion(settings)
    (settings.state_dir / "strata.db").unlink()
    runner = CliRunner()
    workspace = ["-w", str(settings.workspace)]

    refused = runner.invoke(app, ["learn", "--learner", "digits", *workspace])
    assert refused.exit_code == 2
    assert "run `strata doctor --repair`" in refused.stdout and "strata init" not in refused.stdout
    assert runner.invoke(app, ["init", str(settings.workspace)]).exit_code == 2  # refused: it would disown the runs
    repaired = runner.invoke(app, ["doctor", "--repair", *workspace])
    assert repaired.exit_code == 0, repaired.stdout
    assert registered(settings) == before and champion(settings) == champion_before

    ingest(settings, digit_batches[2], "digits")
    learned = runner.invoke(app, ["learn", "--learner", "digits", "--budget", "1.0", *workspace])

    assert learned.exit_code == 0, learned.stdout
    after = registered(settings)
    assert {v: after[v] for v in before} == before and len(after) == len(before) + 1
    assert champion(settings) in (champion_before, max(after, key=int))  # kept, or the gate chose the new one
    classes = client_of(settings).get_model_version(MODEL, max(after, key=int)).tags["strata.classes"]
    assert classes == "0,1,2,3,4,5"
