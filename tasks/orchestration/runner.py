"""Running Strata from Prefect: ``strata deploy``, ``strata worker`` and ``strata serve-flows``.

``deploy`` creates or updates the deployments declared in ``prefect.yaml`` on the configured Prefect
API (``PREFECT_API_URL``), one ``learn`` deployment per learner, and sizes the ``gpu`` global
concurrency limit that training steps take. ``worker`` runs Prefect's own process worker on the pool;
``serve_flows`` serves the same deployments from one process, for a single machine without a pool.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from strata.models.errors import UnavailableError
from strata.tasks.ledger.increments import learners as ledger_learners
from strata.tasks.ledger.migrate import ledger
from strata.tasks.orchestration.deployments import (
    Declared,
    DeploymentError,
    apply_to_pool,
    declare,
    declared_entries,
    project_file,
    runner_deployment,
)
from strata.tasks.orchestration.gpu_slots import GPU_LIMIT, ensure_limit
from strata.tasks.workspace.settings import StrataSettings, load_settings, redact_url
from strata.tasks.workspace.setup import find_workspace

DEFAULT_POOL = "strata"


class PrefectUnavailableError(UnavailableError):
    """The configured Prefect API does not answer: nothing can be deployed, served or run until it does."""


def declared_deployments(
    learners: list[str] | None, settings: StrataSettings, prefect_file: Path | None = None
) -> list[Declared]:
    """The workspace's deployments: per-learner entries for ``learners`` (default: every learner it has)."""
    if not learners:
        with ledger(settings.ledger_url) as session:
            learners = [row.name for row in ledger_learners(session)]
        if not learners:
            raise DeploymentError(
                "the workspace has no learner yet: ingest a batch first (`strata ingest SRC "
                "--learner NAME`) or name one with --learner"
            )
    return declare(
        declared_entries(prefect_file or project_file(settings.workspace)), sorted(set(learners)), settings.workspace
    )


def _require_api() -> None:
    """A configured Prefect API that answers its health check, before anything is declared on it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeploymentError(
            "no Prefect API configured: start a server (`prefect server start --host 127.0.0.1`) "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise PrefectUnavailableError(
            f"the Prefect API at {redact_url(url)} does not answer ({failure}): start the server "
            "(`prefect server start --host 127.0.0.1`) or fix PREFECT_API_URL"
        )


def deploy(
    learners: list[str] | None = None,
    pool: str | None = None,
    gpu_slots: int | None = None,
    workspace: Path | None = None,
    prefect_file: Path | None = None,
) -> list[str]:
    """Create or update every declared deployment; returns their ``flow/deployment`` names."""
    _require_api()
    declared = declared_deployments(learners, load_settings(workspace or find_workspace()), prefect_file)
    ensure_limit(GPU_LIMIT, gpu_slots)
    apply_to_pool(declared, pool)
    return [d.full_name for d in declared]


def serve_flows(
    learners: list[str] | None = None,
    gpu_slots: int | None = None,
    workspace: Path | None = None,
    prefect_file: Path | None = None,
    limit: int | None = None,
) -> None:
    """Serve every declared deployment from this process (schedules and triggers included) until stopped.

    Runs start in the workspace: the process changes into it first, since served runs inherit its cwd.
    A Prefect server must be running: the UI, and the events that trigger runs, need one that outlives
    this process. On shutdown Prefect pauses the deployments, so no runs pile up for a runner that is
    gone; the next ``serve_flows`` (or ``deploy``) unpauses them.
    """
    from prefect import serve

    _require_api()
    settings = load_settings(workspace or find_workspace())
    declared = declared_deployments(learners, settings, prefect_file)
    os.chdir(settings.workspace)
    ensure_limit(GPU_LIMIT, gpu_slots)
    serve(*(runner_deployment(d, served=True) for d in declared), limit=limit)


def worker(pool: str = DEFAULT_POOL, limit: int | None = None) -> None:
    """Replace this process by Prefect's process worker on ``pool`` (created if missing)."""
    _require_api()
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if limit is not None:
        command += ["--limit", str(limit)]
    os.execv(sys.executable, command)
