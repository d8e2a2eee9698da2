"""The learning loop end to end: Prefect flows, a real MLflow store, a git+DVC workspace, the ledger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from strata.flows.learn import LearnParams, learn
from strata.models.methods.base import Method
from strata.tasks.data.ingest import ingest
from strata.tasks.ledger import increments as increments_module
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.ledger.store import LeaseHeldError, acquire_lease, find_learner, ledger_session
from strata.tasks.tracking.champion import promote, rollback, status
from strata.tasks.tracking.promotion import GateConfig
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import init_workspace

LENIENT = GateConfig(old_accuracy_budget=1.0, accuracy_floor=0.0)


def _workspace(tmp_path, batches):
    init_workspace(tmp_path / "ws")
    settings = load_settings(tmp_path / "ws")
    for batch in batches:
        ingest(settings, batch, "digits")
    return settings


def _learn(settings, **params):
    return learn(LearnParams(learner="digits", workspace=str(settings.workspace), show_progress=False, **params))


def _client(settings):
    return MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)


def _versions(settings):
    return sorted(int(v.version) for v in _client(settings).search_model_versions("name = 'strata-digits'"))


def _ledger(settings):
    engine = migrated_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        learner = find_learner(session, "digits")
        rows = [(i.task_index, i.status, i.model_version) for i in increments_module.increments(session, learner)]
        classes = sorted(
            (c.class_id, c.name, c.first_task)
            for c in session.scalars(__import__("sqlalchemy").select(increments_module.LearnedClass))
        )
    engine.dispose()
    return rows, classes


def test_three_batches_become_three_tracked_registered_increments(tmp_path, prefect_server, digit_batches):
    settings = _workspace(tmp_path, digit_batches[:3])
    result = _learn(settings, gate=LENIENT)
    assert [item["promoted"] for item in result["learned"]] == [True, True, True]

    rows, classes = _ledger(settings)
    assert rows == [(0, "succeeded", "1"), (1, "succeeded", "2"), (2, "succeeded", "3")]
    assert classes == [(0, "0", 0), (1, "1", 0), (2, "2", 1), (3, "3", 1), (4, "4", 2), (5, "5", 2)]

    client = _client(settings)
    experiment = client.get_experiment_by_name("strata/digits")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    history = client.get_metric_history(parents[0].info.run_id, "accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    child = min(children, key=lambda r: r.data.tags["strata.task_index"])
    assert child.data.params["method"] == "simplecil" and child.data.params["backbone"] == "tiny"
    assert child.data.tags["strata.dvc_md5"].endswith(".dir")
    assert child.inputs.dataset_inputs[0].dataset.digest == child.data.tags["strata.dvc_md5"][:36]
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"metrics.json", "accuracy_curve.png", "accuracy_matrix.png", "state", "gate.json"} <= artifacts

    assert _versions(settings) == [1, 2, 3]
    version = client.get_model_version("strata-digits", "3")
    assert version.tags["strata.task_index"] == "2" and version.tags["strata.classes"] == "0,1,2,3,4,5"
    assert str(client.get_model_version_by_alias("strata-digits", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("strata-digits", "candidate").version) == "3"

    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model("models:/strata-digits@champion")
    predictions = model.predict(np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32))
    assert set(predictions) <= {"0", "1", "2", "3", "4", "5"} and len(predictions) == 3

    again = _learn(settings, gate=LENIENT)
    assert again["learned"] == [] and _versions(settings) == [1, 2, 3]
    assert status("digits", settings.workspace)[0]["champion"] == "3"


def test_gate_registers_but_does_not_promote_a_forgetful_candidate(tmp_path, prefect_server, digit_batches):
    settings = _workspace(tmp_path, digit_batches[:2])
    strict = GateConfig(old_accuracy_budget=0.0, accuracy_floor=0.0)
    result = _learn(settings, gate=strict)
    assert [item["promoted"] for item in result["learned"]] == [True, False]
    client = _client(settings)
    assert _versions(settings) == [1, 2]
    assert str(client.get_model_version_by_alias("strata-digits", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("strata-digits", "candidate").version) == "2"
    (learner,) = status("digits", settings.workspace)
    assert learner["increments"][1]["promoted"] is False
    assert any("beyond the budget" in reason for reason in _gate_reasons(settings, 1))

    assert promote("digits", "2", settings.workspace) == "1"
    assert str(client.get_model_version_by_alias("strata-digits", "champion").version) == "2"
    assert rollback("digits", settings.workspace) == "1"
    assert str(client.get_model_version_by_alias("strata-digits", "champion").version) == "1"
    actors = [p["actor"] for p in status("digits", settings.workspace)[0]["promotions"]]
    assert actors == ["gate", "promote", "rollback"]
    with pytest.raises(ValueError, match="no version 9"):
        promote("digits", "9", settings.workspace)


def test_failed_increment_keeps_last_good_state_and_is_retried(tmp_path, prefect_server, digit_batches, monkeypatch):
    settings = _workspace(tmp_path, digit_batches[:2])
    original = Method.learn

    def crash_on_task_one(self, task, engine):
        if task.index == 1:
            raise RuntimeError("simulated crash during training")
        return original(self, task, engine)

    monkeypatch.setattr(Method, "learn", crash_on_task_one)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _learn(settings, gate=LENIENT)
    rows, classes = _ledger(settings)
    assert rows == [(0, "succeeded", "1"), (1, "failed", None)]
    assert [c[1] for c in classes] == ["0", "1"]
    assert str(_client(settings).get_model_version_by_alias("strata-digits", "champion").version) == "1"

    monkeypatch.setattr(Method, "learn", original)
    result = _learn(settings, gate=LENIENT)
    assert [item["batch_id"] for item in result["learned"]] == [digit_batch_id(settings, 1)]
    assert _ledger(settings)[0] == [(0, "succeeded", "1"), (1, "succeeded", "2")]


def _gate_reasons(settings, task_index):
    engine = migrated_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        learner = find_learner(session, "digits")
        (row,) = [i for i in increments_module.increments(session, learner) if i.task_index == task_index]
        reasons = row.metrics["gate"]
    engine.dispose()
    return reasons


def digit_batch_id(settings, index):
    engine = migrated_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        batch = find_learner(session, "digits").data_versions[index].batch_id
    engine.dispose()
    return batch


def test_crash_after_registration_leaves_one_version_per_increment(
    tmp_path, prefect_server, digit_batches, monkeypatch
):
    settings = _workspace(tmp_path, digit_batches[:1])

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the ledger commit")

    monkeypatch.setattr("strata.tasks.tracking.recorder.finish_increment", crash)
    with pytest.raises(RuntimeError, match="before the ledger commit"):
        _learn(settings, gate=LENIENT)
    assert _versions(settings) == [1]  # registered, never recorded
    monkeypatch.undo()
    _learn(settings, gate=LENIENT)
    assert _versions(settings) == [2]  # the orphan was removed: one version for task 0
    assert _ledger(settings)[0] == [(0, "succeeded", "2")]


def test_a_held_lease_stops_a_second_learn(tmp_path, prefect_server, digit_batches):
    from datetime import timedelta

    settings = _workspace(tmp_path, digit_batches[:1])
    engine = migrated_engine(settings.ledger_url)
    with ledger_session(engine) as session:
        learner_id = find_learner(session, "digits").id
    acquire_lease(engine, learner_id, "another-host:123", timedelta(minutes=5))
    with pytest.raises(LeaseHeldError, match="another-host:123 holds its lease"):
        _learn(settings)
    rows, _ = _ledger(settings)
    assert rows == []
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path):
    """A real `mlflow server` subprocess on 127.0.0.1 over a SQLite or PostgreSQL backend store."""
    import subprocess
    import sys
    import time
    import urllib.request
    from contextlib import ExitStack

    from tests.conftest import free_port, scratch_postgres_database

    with ExitStack() as stack:  # the database, if any, is dropped after the server has stopped
        if request.param == "sqlite":
            backend = f"sqlite:///{tmp_path / 'mlflow-server.db'}"
        else:
            database = stack.enter_context(scratch_postgres_database("strata_mlflow"))
            backend = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
        port = free_port()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                str(tmp_path / "server-artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log = process.stderr.read().decode()[-2000:]
                        raise RuntimeError(f"mlflow server did not start: {log}") from None
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_learn_through_a_real_mlflow_server(tmp_path, prefect_server, digit_batches, mlflow_server, monkeypatch, capfd):
    """Strata against a tracking server, with credentials in its URL that no output, artifact or run may show."""
    from prefect import get_client

    with_credentials = mlflow_server.replace("http://", "http://strata:s3cret-pw@")  # the server ignores them
    monkeypatch.setenv("STRATA_MLFLOW_TRACKING_URI", with_credentials)  # as a user points Strata at a server
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # Strata sets it for such a URI
    settings = _workspace(tmp_path, digit_batches[:1])
    assert settings.mlflow_tracking_uri == with_credentials
    _learn(settings, gate=LENIENT)
    client = MlflowClient(mlflow_server, mlflow_server)
    assert str(client.get_model_version_by_alias("strata-digits", "champion").version) == "1"
    (child,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("strata/digits").experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]
    assert {"metrics.json", "state"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    assert client.get_metric_history(child.info.run_id, "accuracy")[0].step == 0
    assert "s3cret-pw" not in repr((child.data.params, child.data.tags))
    assert "s3cret-pw" not in "".join(capfd.readouterr())
    with get_client(sync_client=True) as prefect:  # the newest artifacts: this test's increment's; raw body,
        # since 3.8.8's read_artifacts sends explicit nulls the server refuses
        response = prefect._client.post("/artifacts/filter", json={"sort": "CREATED_DESC", "limit": 20, "offset": 0})
    shown = [str(artifact["data"]) for artifact in response.json()]
    assert any("strata:***@" in text for text in shown), "the increment summary names the tracking server"
    assert not any("s3cret-pw" in text for text in shown)


def test_a_training_method_learns_several_increments_in_one_process(tmp_path, prefect_server, digit_batches):
    """Logging a model validates it by loading it in this process; that must not disturb later training."""
    import torch

    settings = _workspace(tmp_path, digit_batches[:2])
    result = _learn(settings, method="finetune_head", config={"train": {"epochs": 1}}, gate=LENIENT)
    assert len(result["learned"]) == 2 and torch.is_grad_enabled()


def test_export_a_registered_version_and_serve_the_champion(tmp_path, prefect_server, digit_batches):
    import mlflow

    from strata.flows.export import ExportParams, export, registry_source

    settings = _workspace(tmp_path, digit_batches[:2])
    _learn(settings, gate=GateConfig(old_accuracy_budget=0.0))  # champion stays v1, candidate v2
    report = export(ExportParams(learner="digits", workspace=str(settings.workspace), triton=str(tmp_path / "triton")))
    assert report["version"] == "1" and report["parity"]["max_abs_diff"] <= 1e-4
    folder = Path(report["directory"])
    assert {"model.onnx", "labels.json", "model.json"} <= {p.name for p in folder.iterdir()}
    assert (tmp_path / "triton" / "strata-digits" / "1" / "model.onnx").is_file()
    tags = _client(settings).get_model_version("strata-digits", "1").tags
    assert tags["strata.onnx_model_uri"] == report["model_uri"]
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    pixels = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    scores = mlflow.pyfunc.load_model(report["model_uri"]).predict({"pixels": pixels})
    assert np.asarray(list(scores.values())[0] if isinstance(scores, dict) else scores).shape == (2, 2)

    source = registry_source("digits", workspace=str(settings.workspace))
    assert source.current().version == "1"
    promote("digits", "2", settings.workspace)
    moved = source.current()  # the champion moved: the server's next poll exports and serves v2
    assert moved.version == "2" and (moved.directory / "model.onnx").is_file()
    with pytest.raises(Exception, match="no version 7"):
        export(ExportParams(learner="digits", version="7", workspace=str(settings.workspace)))


def test_an_increment_trains_on_two_processes_and_the_flow_goes_on_from_their_state(
    tmp_path, prefect_server, digit_batches
):
    settings = _workspace(tmp_path, digit_batches[:2])
    result = _learn(
        settings, gate=LENIENT, method="finetune_head", processes=2, config={"train": {"epochs": 1, "batch_size": 16}}
    )
    assert len(result["learned"]) == 2
    rows, _ = _ledger(settings)
    assert rows == [(0, "succeeded", "1"), (1, "succeeded", "2")]
    from safetensors.torch import load_file

    first, second = (
        load_file(str(settings.state_dir / "increments" / "digits" / f"task-{t:03d}" / "state" / "state.safetensors"))
        for t in (0, 1)
    )
    shared = sorted(set(first) & set(second))
    assert shared and any(not torch.equal(first[k], second[k]) for k in shared), "task 1 changed nothing"
