"""A learner's history in real stores (git + DVC workspace, SQLite ledger, MLflow registry, Prefect flows):
rollback walks back through the champions, a killed export never blocks serving, a rejected ``--config``
is never stored, and a failing later task does not hide what was learned before it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from strata.cli.app import app
from strata.flows import learn as learn_flow
from strata.models.errors import UnavailableError
from strata.tasks.data.ingest import ingest
from strata.tasks.doctor.checks import diagnose
from strata.tasks.ledger.store import find_learner, ledger_session, make_engine
from strata.tasks.serving.app import ModelHolder
from strata.tasks.workspace.settings import load_settings
from tests.conftest import learn_digit_batches
from tests.test_ingest import image_tree

runner = CliRunner()


@pytest.fixture(scope="module")
def learned(tmp_path_factory, prefect_server, digit_batches):
    """Learner ``digits`` after three batches, every one promoted: versions 1, 2, 3, champion 3."""
    return load_settings(learn_digit_batches(tmp_path_factory.mktemp("history") / "ws", digit_batches[:3]))


def _champion(settings) -> str:
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    return str(client.get_model_version_by_alias("strata-digits", "champion").version)


def _cli(settings, *args: str):
    return runner.invoke(app, [*args, "-w", str(settings.workspace)])


def test_rollback_walks_back_through_the_champions(learned):
    assert _champion(learned) == "3"
    lines = [_cli(learned, "rollback", "--learner", "digits").output.strip() for _ in range(2)]
    assert lines == ["champion of digits rolled back to v2", "champion of digits rolled back to v1"]
    assert _champion(learned) == "1"
    refused = _cli(learned, "rollback", "--learner", "digits")
    assert refused.exit_code == 2 and "no earlier champion" in refused.output and _champion(learned) == "1"
    assert _cli(learned, "promote", "--learner", "digits", "--version", "3").exit_code == 0
    assert _cli(learned, "rollback", "--learner", "digits").output.strip() == "champion of digits rolled back to v1"
    assert diagnose(learned) == []


def test_a_killed_export_does_not_block_serving_the_champion(learned):
    """What a SIGKILL in the middle of ``strata export`` leaves (a real one: tests/test_publishing.py)."""
    from strata.flows.export import registry_source

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    exports = learned.state_dir / "exports" / "digits"
    partial = exports / f"v1.partial-{dead.stdout.strip()}"
    partial.mkdir(parents=True)
    (partial / "model.onnx").write_bytes(b"\x08\x07half a graph")

    holder = ModelHolder.load(registry_source("digits", workspace=str(learned.workspace)))
    assert holder.model.ref.version == "1" and len(holder.model.labels) == 2
    assert [p.name for p in exports.iterdir()] == ["v1"]  # the killed export's folder is gone
    assert diagnose(learned) == []


def test_a_rejected_config_is_not_stored_and_a_correct_one_learns(learned, tmp_path):
    ingest(learned, image_tree(tmp_path / "pets", {"cat": 4, "dog": 4}), "pets")
    bad = _cli(learned, "learn", "--learner", "pets", "--config", '{"train": {"epochs": "many"}, "colour": 1}')
    assert bad.exit_code == 2, bad.output
    (line,) = bad.output.strip().splitlines()
    assert "--config" in line and "not a valid simplecil config" in line and "train.epochs" in line, line
    assert "colour: Extra inputs are not permitted" in line, line
    engine = make_engine(learned.ledger_url)
    with ledger_session(engine) as session:
        row = find_learner(session, "pets")
        assert (row.method, row.method_config) == (None, {})
    engine.dispose()
    good = _cli(learned, "learn", "--learner", "pets", "--config", '{"train": {"epochs": 1}}', "--device", "cpu")
    assert good.exit_code == 0 and "learned batch-" in good.output, good.output
    assert diagnose(learned) == []


def test_a_later_task_failing_still_shows_what_was_learned_before_it(learned, digit_batches, monkeypatch):
    for batch in digit_batches[3:5]:
        ingest(learned, batch, "digits")
    trained = learn_flow.train

    def gpu_lost_on_task_4(run, stream):
        if stream.tasks[-1].index == 4:
            raise UnavailableError("the GPU fell off the bus (injected)")
        return trained(run, stream)

    monkeypatch.setattr(learn_flow, "train", gpu_lost_on_task_4)
    result = _cli(learned, "learn", "--learner", "digits", "--budget", "1", "--device", "cpu")
    assert result.exit_code == 3, result.output
    shown = " ".join(result.output.split())  # rich wraps long lines; progress bars share the output
    summary = r"learned task 3 \(batch-\w+\) → version 4, champion; task 4 \(batch-\w+\) failed: "
    assert re.search(summary + r"error: the GPU fell off the bus \(injected\)", shown), shown
    assert _champion(learned) == "4"
    assert diagnose(learned) == []
