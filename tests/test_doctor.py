"""``strata doctor``: each broken link between the stores is exactly one finding, and ``--repair`` rebuilds a lost
ledger from git, DVC and MLflow so that learning continues where it was, without deleting a registered version.

One workspace (real git, DVC with its local remote, the MLflow SQLite store, the ledger) learns two tasks once per
session; each test damages a copy of it (a copy is a workspace of its own on first use).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sqlalchemy import select
from typer.testing import CliRunner

from strata.cli.app import app
from strata.flows.learn import LearnParams, learn
from strata.tasks.data.ingest import ingest
from strata.tasks.doctor.checks import Finding, diagnose
from strata.tasks.doctor.repair import repair
from strata.tasks.ledger.migrate import migrated_engine
from strata.tasks.ledger.store import Increment, LearnedClass, Learner, ledger_session
from strata.tasks.tracking import runs
from strata.tasks.tracking.promotion import CHAMPION, GateConfig
from strata.tasks.workspace.identity import open_workspace
from strata.tasks.workspace.settings import StrataSettings, load_settings

LENIENT = GateConfig(old_accuracy_budget=1.0, accuracy_floor=0.0)
MODEL = "strata-digits"


def copy_of(template: Path, into: Path) -> StrataSettings:
    """A copy of the template, opened as every command opens it (it becomes a workspace of its own)."""
    shutil.copytree(template, into / "ws", symlinks=True)
    settings = load_settings(into / "ws")
    open_workspace(settings)
    return settings


def learn_all(settings: StrataSettings) -> dict:
    return learn(LearnParams(learner="digits", workspace=str(settings.workspace), show_progress=False, gate=LENIENT))


def client_of(settings: StrataSettings) -> MlflowClient:
    return MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)


def registered(settings: StrataSettings) -> dict[str, str]:
    """Registered versions of the learner: number → the run that registered it."""
    return {str(v.version): v.run_id for v in client_of(settings).search_model_versions(f"name = '{MODEL}'")}


def champion(settings: StrataSettings) -> str:
    return str(client_of(settings).get_model_version_by_alias(MODEL, CHAMPION).version)


def ledger_rows(settings: StrataSettings) -> tuple[list[tuple], list[tuple], tuple]:
    engine = migrated_engine(settings.ledger_url)
    try:
        with ledger_session(engine) as session:
            increments = [
                (i.task_index, i.status, i.model_version)
                for i in session.scalars(select(Increment).order_by(Increment.task_index))
            ]
            classes = [(c.class_id, c.name, c.first_task) for c in session.scalars(select(LearnedClass))]
            learner = session.scalars(select(Learner)).one()
            spec = (learner.name, learner.method, learner.backbone, learner.method_config)
        return increments, sorted(classes), spec
    finally:
        engine.dispose()


@pytest.fixture()
def workspace(tmp_path, learned_digits) -> StrataSettings:
    return copy_of(learned_digits, tmp_path)


def _shape(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.store, f.subject) for f in findings]


def test_a_healthy_workspace_has_no_findings_and_doctor_says_so(workspace):
    assert diagnose(workspace) == []
    result = CliRunner().invoke(app, ["doctor", "-w", str(workspace.workspace)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"workspace {workspace.workspace}: healthy (2 data versions, 2 increments checked)\n"


def _delete_checkpoint(settings: StrataSettings) -> None:
    shutil.rmtree(settings.state_dir / "increments" / "digits" / "task-001" / "state")


def _delete_version(settings: StrataSettings) -> None:
    client_of(settings).delete_model_version(MODEL, "1")


def _champion_on_unknown_version(settings: StrataSettings) -> None:
    client = runs.configure(settings)  # registering resolves the run through MLflow's global tracking URI
    one = client.get_model_version(MODEL, "1")
    extra = client.create_model_version(MODEL, one.source, run_id=one.run_id, tags=one.tags)
    client.set_registered_model_alias(MODEL, CHAMPION, extra.version)


def _delete_remote(settings: StrataSettings) -> None:
    shutil.rmtree(settings.dvc_remote)


def _kill_an_export(settings: StrataSettings) -> None:
    (settings.state_dir / "exports" / "digits" / "v2.partial-99999999").mkdir(parents=True)


def _delete_ledger(settings: StrataSettings) -> None:
    (settings.state_dir / "strata.db").unlink()


@pytest.mark.parametrize(
    ("damage", "expected", "problem"),
    [
        (_delete_checkpoint, [("checkpoint", "learner digits task 1")], "is missing"),
        (_delete_version, [("registry", "learner digits task 0")], f"{MODEL} has no version 1"),
        (
            _champion_on_unknown_version,
            [("registry", f"{MODEL} v3"), ("registry", f"{MODEL}@champion")],
            "not recorded in the ledger",
        ),
        (_delete_remote, [("dvc", "remote {remote}")], "the DVC remote folder is missing"),
        (_kill_an_export, [("export", ".strata/exports/digits/v2.partial-99999999")], "did not finish"),
        (_delete_ledger, [("ledger", "{ledger}")], "the ledger database is missing"),
    ],
    ids=["checkpoint", "registered-version", "champion-alias", "dvc-remote", "export", "ledger"],
)
def test_each_damage_is_exactly_its_finding(workspace, damage, expected, problem):
    damage(workspace)
    findings = diagnose(workspace)
    names = {"remote": ".strata/dvc-remote", "ledger": ".strata/strata.db"}
    assert _shape(findings) == [(store, subject.format(**names)) for store, subject in expected]
    assert problem in findings[0].problem
    assert all("\n" not in str(f) and f.fix for f in findings)


def test_repair_restores_a_checkpoint_and_the_remote_and_deletes_nothing_registered(workspace):
    before = registered(workspace)
    _delete_checkpoint(workspace)
    _delete_remote(workspace)
    _kill_an_export(workspace)

    steps = repair(workspace)

    assert any(s.startswith("dvc: pushed") for s in steps), steps
    assert "export: removed .strata/exports/digits/v2.partial-99999999, left by an export that did not finish" in steps
    assert any(s.startswith("checkpoint: restored .strata/increments/digits/task-001/state") for s in steps), steps
    assert diagnose(workspace) == []
    assert registered(workspace) == before


def test_a_lost_ledger_is_rebuilt_and_learning_continues_the_learner(workspace, digit_batches):
    original = ledger_rows(workspace)
    before, champion_before = registered(workspace), champion(workspace)
    _delete_ledger(workspace)
    runner = CliRunner()

    damaged = runner.invoke(app, ["doctor", "-w", str(workspace.workspace)])
    assert damaged.exit_code == 4
    assert (
        damaged.stdout.splitlines()[-1]
        == f"workspace {workspace.workspace}: 1 problem (0 data versions, 0 increments checked)"
    )

    repaired = runner.invoke(app, ["doctor", "--repair", "-w", str(workspace.workspace)])
    assert repaired.exit_code == 0, repaired.output
    assert repaired.stdout.splitlines()[-1].endswith("healthy (2 data versions, 2 increments checked)")
    assert ledger_rows(workspace) == original  # increments, classes (ids, first task) and the learner's spec
    assert registered(workspace) == before and champion(workspace) == champion_before

    ingest(workspace, digit_batches[2], "digits")
    result = learn_all(workspace)

    assert [item["task"] for item in result["learned"]] == [2]  # continued, not started over
    increments, classes, _ = ledger_rows(workspace)
    assert [row[:2] for row in increments] == [(0, "succeeded"), (1, "succeeded"), (2, "succeeded")]
    assert [c[1] for c in classes] == ["0", "1", "2", "3", "4", "5"]
    after = registered(workspace)
    assert after.items() >= before.items() and len(after) == len(before) + 1  # nothing registered was deleted
    assert diagnose(workspace) == []
