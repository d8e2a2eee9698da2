"""``kill -9`` at every step of ``strata ingest`` and ``strata learn``: the next run completes the work.

Each command runs as a real process that SIGKILLs itself at a chosen point (``tests/killpoint.py``):
no ``except`` or ``finally`` runs, locks are dropped by the OS, the ledger and MLflow keep whatever
was committed. The recovering run is the ordinary command, in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sqlalchemy import select

from strata.flows.learn import LearnParams, learn
from strata.tasks.data.ingest import BATCHES, ingest
from strata.tasks.data.versioning import dvc_repo, git
from strata.tasks.ledger.increments import increments
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.ledger.store import DataVersion, Lease, find_learner, ledger_session
from strata.tasks.tracking.promotion import CHAMPION, GateConfig
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import init_workspace

ROOT = Path(__file__).resolve().parents[1]
KILLPOINT = [sys.executable, str(ROOT / "tests" / "killpoint.py")]
LENIENT = GateConfig(old_accuracy_budget=1.0, accuracy_floor=0.0)
APER = {"train": {"epochs": 2}}


def _killed(target: str, when: str, args: list[str], cwd: Path, **env: str) -> None:
    """Run ``strata ARGS`` in ``cwd`` and check that it died of SIGKILL at ``target``."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run(
        [*KILLPOINT, target, when, "--", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, f"not killed at {target}:\n{done.stdout}\n{done.stderr}"


def _ledger(settings, learner: str):
    engine = migrated_engine(settings.ledger_url)
    try:
        with ledger_session(engine) as session:
            row = find_learner(session, learner)
            versions = list(session.scalars(select(DataVersion.batch_id)))
            rows = [(i.task_index, i.status) for i in increments(session, row)] if row else []
            leases = list(session.scalars(select(Lease.holder)))
        return versions, rows, leases
    finally:
        engine.dispose()


@pytest.mark.parametrize("step", ["_copy", "dvc_add", "commit_paths", "dvc_push"])
def test_ingest_killed_after_each_step_is_completed_by_the_next_ingest(tmp_path, digit_batches, step):
    init_workspace(tmp_path / "ws")
    settings = load_settings(tmp_path / "ws")
    _killed(
        f"strata.tasks.data.ingest:{step}",
        "return",
        ["ingest", str(digit_batches[0]), "--learner", "digits"],
        settings.workspace,
    )
    assert _ledger(settings, "digits")[0] == []  # the ledger row is the last step: no version yet

    result = ingest(settings, digit_batches[0], "digits")

    assert result.created
    assert _ledger(settings, "digits")[0] == [result.batch_id]
    with dvc_repo(settings.workspace) as repo:
        assert repo.status() == {}
        assert repo.status(cloud=True) == {}  # everything in the cache is on the remote
    assert git(settings.workspace, "status", "--porcelain") == ""
    batches = settings.workspace / BATCHES
    assert sorted(p.name for p in batches.iterdir()) == [".gitignore", result.batch_id, f"{result.batch_id}.dvc"]
    assert ingest(settings, digit_batches[0], "digits").created is False


def _registered(client: MlflowClient) -> dict[str, list[str]]:
    """Registered versions of strata-digits by the task index they were registered for."""
    by_task: dict[str, list[str]] = {}
    for version in client.search_model_versions("name = 'strata-digits'"):
        by_task.setdefault(version.tags["strata.task_index"], []).append(str(version.version))
    return by_task


def _champion(client: MlflowClient) -> str | None:
    aliases = client.get_registered_model("strata-digits").aliases if _registered(client) else {}
    return str(aliases[CHAMPION]) if CHAMPION in aliases else None


def test_learn_killed_in_training_logging_and_registration_is_completed_by_the_next_learn(
    tmp_path, prefect_server, digit_batches
):
    """One learner, three tasks, one kill each: during training (end of the first epoch), during MLflow
    logging (before the state artifacts) and right after the version was registered."""
    from prefect.settings import PREFECT_API_URL

    init_workspace(tmp_path / "ws")
    settings = load_settings(tmp_path / "ws")
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    learn_args = [
        "learn",
        "--learner",
        "digits",
        "--method",
        "aper_ssf",
        "--config",
        '{"train": {"epochs": 2}}',
        "--budget",
        "1.0",
    ]
    kills = [
        ("strata.tasks.orchestration.artifacts:TrainingProgress.__call__", "call"),
        ("mlflow:log_artifacts", "call"),
        ("strata.tasks.tracking.runs:log_and_register", "return"),
    ]
    for task_index, (target, when) in enumerate(kills):
        ingest(settings, digit_batches[task_index], "digits")
        champion = _champion(client)

        _killed(target, when, learn_args, settings.workspace, PREFECT_API_URL=PREFECT_API_URL.value())

        _, rows, leases = _ledger(settings, "digits")
        assert rows[-1] == (task_index, "running"), target  # no one lived to mark it failed
        assert len(leases) == 1  # the dead run's lease, taken over below without waiting for its expiry
        assert _champion(client) == champion, target
        killed_runs = {
            r.info.run_id
            for r in client.search_runs(
                [client.get_experiment_by_name("strata/digits").experiment_id], "attributes.status = 'RUNNING'"
            )
        }
        assert killed_runs, target

        result = learn(
            LearnParams(learner="digits", workspace=str(settings.workspace), show_progress=False, gate=LENIENT)
        )

        assert [item["promoted"] for item in result["learned"]] == [True], target
        _, rows, leases = _ledger(settings, "digits")
        assert rows == [(i, "succeeded") for i in range(task_index + 1)], target
        assert leases == []
        by_task = _registered(client)
        assert all(len(versions) == 1 for versions in by_task.values()), by_task  # no duplicate per increment
        assert _champion(client) == by_task[str(task_index)][0]
        assert {client.get_run(run_id).info.status for run_id in killed_runs} == {"KILLED"}
