"""Scheduling from Prefect: prefect.yaml → deployments, event triggers, per-learner queueing, workers, serve.

The end-to-end tests start a real ``prefect server`` process on 127.0.0.1 (SQLite in a temporary
PREFECT_HOME) and drive it only the ways a user would: the ``strata`` CLI in subprocesses, and plain
HTTP for the events a data pipeline that does not run Python would post.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from strata.tasks.data.ingest import ingest
from strata.tasks.orchestration.deployments import DeploymentError, declare, declared_entries, render, runner_deployment
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import init_workspace
from tests.conftest import free_port, scratch_postgres_database

ROOT = Path(__file__).resolve().parents[1]
STRATA = [sys.executable, "-m", "strata.cli.app"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_prefect_yaml_declares_learn_per_learner_with_schedule_trigger_and_queue(tmp_path):
    declared = declare(declared_entries(ROOT / "prefect.yaml"), ["cats", "pets"], tmp_path)
    assert sorted(d.full_name for d in declared) == ["benchmark/manual", "export/manual", "learn/cats", "learn/pets"]
    pets = next(d for d in declared if d.full_name == "learn/pets")
    deployment = runner_deployment(pets)
    assert deployment.entrypoint == "strata.flows.learn.learn" and deployment.work_pool_name == "strata"
    assert deployment.parameters == {"params": {"learner": "pets", "show_progress": False}}
    assert deployment.job_variables == {"working_dir": str(tmp_path)}
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    (trigger,) = deployment.triggers
    assert trigger.expect == {"strata.batch.ingested"}
    assert trigger.match_related.root == {
        "prefect.resource.role": "learner",
        "prefect.resource.id": "strata.learner.pets",
    }
    assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert deployment.concurrency_limit == 1
    served = runner_deployment(pets, served=True)
    assert served.work_pool_name is None and served.schedules and served.triggers


def test_declarations_refuse_unknown_placeholders_and_missing_pieces(tmp_path):
    with pytest.raises(DeploymentError, match=r"\$HOME.*does not fill"):
        render({"name": "{{ $HOME }}"}, {"STRATA_LEARNER": "pets"})
    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n")
    with pytest.raises(DeploymentError, match="needs a `name` and an `entrypoint`"):
        declared_entries(bad)
    bad.write_text("deployments: [")
    with pytest.raises(DeploymentError, match="not valid YAML"):
        declared_entries(bad)


# ---------------------------------------------------------------------------------------------------------------
# a real Prefect server process and the CLI against it


@contextmanager
def prefect_server(home: Path, database_url: str | None = None) -> Iterator[str]:
    """``prefect server start`` on a free loopback port (SQLite in ``home``, or ``database_url``); its API URL."""
    env = _env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false")
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    port = free_port()
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait(
            lambda: _healthy(url), 120, lambda: f"the Prefect server did not start: {(home / 'server.log').read_text()}"
        )
        yield url
    finally:
        _stop(server)
        log.close()


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One real Prefect server process on SQLite for this module's end-to-end tests."""
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
        PYTHONPATH=str(ROOT),
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    env.update(extra)
    return env


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(predicate, seconds: float, message) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(message() if callable(message) else message)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _strata(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([*STRATA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"strata {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _workspace(tmp_path: Path, batches: list[Path], learner: str) -> Path:
    """A fresh workspace with ``batches`` ingested in this process (no event reaches the server under test)."""
    workspace = tmp_path / "ws"
    init_workspace(workspace)
    _ingest(workspace, batches, learner)
    return workspace


def _ingest(workspace: Path, batches: list[Path], learner: str) -> None:
    settings = load_settings(workspace)
    for batch in batches:
        ingest(settings, batch, learner)


def _post_ingested(url: str, learner: str, batch_id: str) -> None:
    """What a pipeline that does not run Python sends: one event, plain JSON, to the Prefect API."""
    event = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": "strata.batch.ingested",
        "resource": {"prefect.resource.id": f"strata.batch.{batch_id}"},
        "related": [{"prefect.resource.id": f"strata.learner.{learner}", "prefect.resource.role": "learner"}],
        "payload": {"learner": learner, "batch_id": batch_id},
    }
    assert httpx.post(f"{url}/events", json=[event], timeout=10).status_code == 204


def _deployment_id(url: str, name: str) -> str:
    flow, deployment = name.split("/")
    return httpx.get(f"{url}/deployments/name/{flow}/{deployment}", timeout=10).json()["id"]


def _runs(url: str, deployment_id: str) -> list[dict]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return httpx.post(f"{url}/flow_runs/filter", json=body, timeout=10).json()


def _finished_runs(url: str, deployment_id: str, count: int, logs: list[Path]) -> list[dict]:
    """Wait until ``count`` triggered runs of the deployment have ended; they must all have completed."""

    def ended() -> bool:  # the nightly schedule's future runs are auto-scheduled: not counted
        return sum(r["state_type"] in TERMINAL for r in _runs(url, deployment_id) if not r["auto_scheduled"]) >= count

    _wait(ended, 300, lambda: "triggered runs did not finish:\n" + "\n".join(p.read_text()[-4000:] for p in logs))
    runs = [r for r in _runs(url, deployment_id) if not r["auto_scheduled"]]
    assert [r["state_type"] for r in runs] == ["COMPLETED"] * count, [(r["name"], r["state_name"]) for r in runs]
    return runs


def _limits(url: str) -> dict[str, int]:
    """The global concurrency limits by name."""
    limits = httpx.post(f"{url}/v2/concurrency_limits/filter", json={}, timeout=10).json()
    return {c["name"]: c["limit"] for c in limits}


def _state_names(url: str, run: dict) -> list[str]:
    states = httpx.get(f"{url}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=10).json()
    return [s["name"] for s in sorted(states, key=lambda s: s["timestamp"])]


def _ledger_tasks(workspace: Path, learner: str) -> list[tuple[int, str]]:
    from strata.tasks.ledger.increments import increments
    from strata.tasks.ledger.migrate import ledger
    from strata.tasks.ledger.store import find_learner
    from strata.tasks.workspace.settings import load_settings

    with ledger(load_settings(workspace).ledger_url) as session:
        return [(i.task_index, i.status) for i in increments(session, find_learner(session, learner))]


def test_deploy_worker_and_ingest_events_run_learn_one_run_per_learner_at_a_time(tmp_path, prefect_api, digit_batches):
    workspace = _workspace(tmp_path, digit_batches[:1], "digits")
    api = _env(PREFECT_API_URL=prefect_api)
    deployed = _strata(["deploy", "--gpu-slots", "2"], workspace, api)
    assert "learn/digits" in deployed and "benchmark/manual" in deployed and "export/manual" in deployed
    assert _limits(prefect_api)["gpu"] == 2
    learn_id = _deployment_id(prefect_api, "learn/digits")
    deployment = httpx.get(f"{prefect_api}/deployments/{learn_id}", timeout=10).json()
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [*STRATA, "worker"], cwd=tmp_path, env=api, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # the data team's Python path: `strata ingest` emits strata.batch.ingested; the trigger starts learn
        _strata(["ingest", str(digit_batches[1]), "--learner", "digits"], workspace, api)
        (first,) = _finished_runs(prefect_api, learn_id, 1, [worker_log])
        assert _ledger_tasks(workspace, "digits") == [(0, "succeeded"), (1, "succeeded")]

        # two more batches, then the HTTP path: two events back to back start two runs of the same learner
        _ingest(workspace, digit_batches[2:4], "digits")
        _post_ingested(prefect_api, "digits", "batch-3")
        _post_ingested(prefect_api, "digits", "batch-4")
        runs = _finished_runs(prefect_api, learn_id, 3, [worker_log])
    finally:
        _stop(worker)
    second, third = sorted((r for r in runs if r["id"] != first["id"]), key=lambda r: r["start_time"])
    assert "AwaitingConcurrencySlot" in _state_names(prefect_api, third), "the second run did not queue"
    assert third["start_time"] >= second["end_time"], "two learn runs of one learner overlapped"
    assert _ledger_tasks(workspace, "digits") == [
        (0, "succeeded"),
        (1, "succeeded"),
        (2, "succeeded"),
        (3, "succeeded"),
    ]


def test_serve_flows_runs_triggered_learn_without_a_pool(tmp_path, prefect_api, digit_batches):
    workspace = _workspace(tmp_path, digit_batches[:1], "served")
    shutil.copy(ROOT / "prefect.yaml", workspace / "prefect.yaml")  # a workspace's own copy wins
    text = (workspace / "prefect.yaml").read_text().replace('cron: "0 2 * * *"', 'cron: "30 3 * * *"')
    (workspace / "prefect.yaml").write_text(text)
    api = _env(PREFECT_API_URL=prefect_api)
    gpu_slots = _limits(prefect_api).get("gpu")  # without --gpu-slots, an existing limit is kept as it is
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*STRATA, "serve-flows", "--learner", "served"],
            cwd=workspace,
            env=api,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait(
            lambda: httpx.get(f"{prefect_api}/deployments/name/learn/served", timeout=10).status_code == 200,
            120,
            lambda: log_path.read_text(),
        )
        learn_id = _deployment_id(prefect_api, "learn/served")
        _ingest(workspace, digit_batches[1:2], "served")
        _post_ingested(prefect_api, "served", "batch-2")
        _finished_runs(prefect_api, learn_id, 1, [log_path])
    finally:
        _stop(server)
    deployment = httpx.get(f"{prefect_api}/deployments/{learn_id}", timeout=10).json()
    assert deployment["schedules"][0]["schedule"]["cron"] == "30 3 * * *"
    assert _limits(prefect_api)["gpu"] == (gpu_slots or 1)
    assert _ledger_tasks(workspace, "served") == [(0, "succeeded"), (1, "succeeded")]
    assert json.loads(json.dumps(deployment["parameters"])) == {"params": {"learner": "served", "show_progress": False}}


def test_two_learn_processes_of_one_learner_never_learn_a_task_twice(tmp_path, prefect_api, digit_batches):
    """Two `strata learn` processes started together on one learner: one learns, the other either says who
    holds the learner (exit 2) or, started after the winner finished, finds nothing left; one increment."""
    workspace = _workspace(tmp_path, digit_batches[:1], "raced")
    env = _env(PREFECT_API_URL=prefect_api)
    racers = [
        subprocess.Popen(
            [*STRATA, "learn", "--learner", "raced"],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        outcomes.append((racer.returncode, " ".join((out + err).split())))  # rich wraps long lines
    learned = [text for code, text in outcomes if code == 0 and "learned batch-" in text]
    assert len(learned) == 1, outcomes
    ((code, text),) = [outcome for outcome in outcomes if outcome[1] not in learned]
    assert (code == 2 and "is busy:" in text and "holds its lease" in text) or (
        code == 0 and "has nothing new to learn (1 tasks learned)" in text
    ), outcomes
    assert _ledger_tasks(workspace, "raced") == [(0, "succeeded")]


def test_a_prefect_server_on_postgresql_takes_the_deployments_and_triggers_a_run(tmp_path, digit_batches):
    """The scale-out store: the same deploy and event against a Prefect server on PostgreSQL (no worker)."""
    with scratch_postgres_database("strata_prefect") as database:
        workspace = _workspace(tmp_path, digit_batches[:1], "digits")
        with prefect_server(tmp_path, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}") as url:
            _strata(["deploy", "--pool", "pg-pool"], workspace, _env(PREFECT_API_URL=url))
            learn_id = _deployment_id(url, "learn/digits")
            assert httpx.get(f"{url}/work_pools/pg-pool", timeout=10).json()["type"] == "process"
            _post_ingested(url, "digits", "batch-1")
            _wait(
                lambda: any(not r["auto_scheduled"] for r in _runs(url, learn_id)),
                60,
                "the event did not trigger a learn run",
            )


def test_more_training_processes_than_gpu_slots_is_a_clear_error(prefect_server):
    from prefect import flow, get_client

    from strata.tasks.orchestration.gpu_slots import GPU_LIMIT, ensure_limit, gpu_slots

    @flow
    def hold(count: int) -> str:
        with gpu_slots(count):
            return "held"

    ensure_limit(GPU_LIMIT, 1)
    try:
        assert hold(1) == "held"
        with pytest.raises(DeploymentError, match="2 slots of the `gpu` concurrency limit.*--gpu-slots 2"):
            hold(2)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    assert hold(3) == "held"  # no limit: nothing to wait for
