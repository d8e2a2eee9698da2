"""The CLI's error contract: a mistake, or a store that is down, is one ``error:`` line and a documented
exit code (``strata.models.errors``); a bug keeps its traceback.

One table of every command's common mistakes runs against one real workspace (``strata init``, one
ingested batch, one learned increment with the tiny backbone), from a folder that is no workspace.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from strata.cli.app import app
from strata.models.errors import StrataError, UnavailableError, UserError
from tests.conftest import free_port

runner = CliRunner()
USER, UNAVAILABLE = UserError.exit_code, UnavailableError.exit_code


@pytest.fixture(scope="module")
def places(tmp_path_factory, digit_batches, prefect_server) -> dict[str, str]:
    """``ws``: a workspace whose learner ``digits`` has learned one increment (registered version 1)."""
    root = tmp_path_factory.mktemp("cli-errors")
    ws = str(root / "ws")
    for args in (
        ["init", ws],
        ["ingest", str(digit_batches[0]), "--learner", "digits", "-w", ws],
        ["learn", "--learner", "digits", "--method", "simplecil", "--backbone", "tiny", "-w", ws],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return {"ws": ws, "closed": str(free_port())}


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return lines[0]


# (id, arguments, extra environment, exit code, text the output shows); {ws} is the workspace, {here} the
# folder the command runs in (no workspace), {closed} a port nothing listens on. "Usage:" in the text marks
# click's own usage errors (bad option values), which keep click's format.
WS = ["-w", "{ws}"]
MLFLOW_DOWN = {"STRATA_MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
CASES = [
    ("outside-a-workspace", ["status"], {}, USER, "is not inside a Strata workspace"),
    ("not-a-workspace", ["data", "list", "-w", "{here}"], {}, USER, "is not a Strata workspace"),
    ("status-unknown-learner", ["status", "--learner", "nope", *WS], {}, USER, "no learner 'nope'"),
    (
        "promote-unknown-version",
        ["promote", "--learner", "digits", "--version", "99", *WS],
        {},
        USER,
        "has no version 99;",
    ),
    ("promote-unknown-learner", ["promote", "--learner", "nope", "--version", "1", *WS], {}, USER, "no registered"),
    ("rollback-unknown-learner", ["rollback", "--learner", "nope", *WS], {}, USER, "no earlier champion"),
    (
        "export-unknown-version",
        ["export", "--learner", "digits", "--version", "99", *WS],
        {},
        USER,
        "has no version 99;",
    ),
    ("export-unknown-learner", ["export", "--learner", "nope", *WS], {}, USER, "learner 'nope' has no registered"),
    ("export-unknown-alias", ["export", "--learner", "digits", "--alias", "nope", *WS], {}, USER, "alias 'nope'"),
    ("export-bad-size", ["export", "--learner", "digits", "--with-preprocess", "abc", *WS], {}, USER, "Usage:"),
    ("export-opset-range", ["export", "--learner", "digits", "--opset", "99", *WS], {}, USER, "Usage:"),
    ("serve-unknown-learner", ["serve", "--learner", "nope", *WS], {}, USER, "learner 'nope' has no registered"),
    ("serve-unknown-alias", ["serve", "--learner", "digits", "--alias", "nope", *WS], {}, USER, "alias 'nope'"),
    ("serve-not-an-export", ["serve", "--model-dir", "{here}"], {}, USER, "is not a Strata ONNX export"),
    ("serve-port-range", ["serve", "--model-dir", "{here}", "--port", "70000"], {}, USER, "Usage:"),
    ("learn-unknown-method", ["learn", "--learner", "fresh", "--method", "nope", *WS], {}, USER, "unknown method"),
    ("learn-bad-name", ["learn", "--learner", "no spaces", *WS], {}, USER, "invalid LearnParams parameters: learner"),
    ("ingest-missing-batch", ["ingest", "{here}/nope", "--learner", "digits", *WS], {}, USER, "rejected"),
    ("ingest-bad-name", ["ingest", "{here}", "--learner", "no spaces", *WS], {}, USER, "learner name 'no spaces'"),
    ("data-show-unknown", ["data", "show", "batch-nope", *WS], {}, USER, "no data version 'batch-nope'"),
    ("db-unknown-revision", ["db", "upgrade", "nope", *WS], {}, USER, "cannot migrate the ledger to 'nope'"),
    ("benchmark-unknown-method", ["benchmark", "--method", "nope"], {}, USER, "unknown method 'nope'"),
    ("benchmark-unknown-backbone", ["benchmark", "--backbone", "nope"], {}, USER, "unknown backbone 'nope'"),
    ("benchmark-unknown-profile", ["benchmark", "--profile", "nope"], {}, USER, "unknown profile 'nope'"),
    ("demo-used-folder", ["demo", "--dir", "{ws}"], {}, USER, "is not empty"),
    (
        "mlflow-down-promote",
        ["promote", "--learner", "digits", "--version", "1", *WS],
        MLFLOW_DOWN,
        UNAVAILABLE,
        "MLflow",
    ),
    ("mlflow-down-export", ["export", "--learner", "digits", *WS], MLFLOW_DOWN, UNAVAILABLE, "MLflow"),
    (
        "ledger-down",
        ["status", *WS],
        {"STRATA_LEDGER_URL": "postgresql+psycopg://strata@127.0.0.1:{closed}/strata"},
        UNAVAILABLE,
        "cannot reach the ledger database",
    ),
]


@pytest.mark.parametrize(("args", "env", "exit_code", "shows"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_error_line_and_its_exit_code(places, tmp_path, monkeypatch, args, env, exit_code, shows):
    monkeypatch.chdir(tmp_path)
    where = {**places, "here": str(tmp_path)}
    result = runner.invoke(app, [a.format(**where) for a in args], env={k: v.format(**where) for k, v in env.items()})
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if shows == "Usage:":  # click's usage error: its own format, exit 2, no traceback
        assert shows in result.output and "Traceback" not in result.output, result.output
    else:
        assert shows in one_error_line(result.output)


def test_the_module_entry_point_gives_the_same_line_and_code_for_an_unreachable_prefect_api(places):
    """``python -m strata.cli.app`` in its own process (as tests and workers run it), PREFECT_API_URL at a
    closed port: one line on the console, exit 3."""
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{places['closed']}/api"}
    done = subprocess.run(
        [sys.executable, "-m", "strata.cli.app", "deploy"],
        cwd=places["ws"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == UNAVAILABLE, done.stdout + done.stderr
    assert "the Prefect API at" in one_error_line(done.stdout + done.stderr)


def test_a_bug_keeps_its_traceback(places, monkeypatch):
    """Only Strata's own errors become a line: anything else propagates, so a bug stays visible."""
    bug = RuntimeError("a bug, not a mistake")

    def broken(*_args, **_kwargs):
        raise bug

    monkeypatch.setattr("strata.tasks.tracking.champion.status", broken)
    result = runner.invoke(app, ["status", "-w", places["ws"]])
    assert result.exception is bug and result.exit_code == 1
    assert "error:" not in result.output


def test_every_error_class_the_commands_raise_has_a_category():
    """A StrataError subclass outside UserError/UnavailableError would exit 1, as if it were a bug."""
    import strata.flows.benchmark
    import strata.flows.export
    import strata.tasks.orchestration.runner
    import strata.tasks.serving.app  # noqa: F401  (with the CLI's own imports: every module that defines one)

    def subclasses(cls: type) -> list[type]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))]

    found = subclasses(StrataError)[1:]
    assert len(found) > 20
    assert [cls.__qualname__ for cls in found if not issubclass(cls, UserError | UnavailableError)] == []
