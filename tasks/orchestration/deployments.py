"""Strata's Prefect deployments: declared once in ``prefect.yaml``, turned into Prefect objects per learner.

``prefect.yaml`` declares each deployment the way ``prefect deploy`` reads it (entrypoint, parameters,
schedules, event triggers, concurrency limit, work pool). Here each entry becomes a Prefect
``RunnerDeployment``; the entries that name ``{{ $STRATA_LEARNER }}`` become one per learner.
``apply_to_pool`` creates or updates them on the configured Prefect API, where the workers of a pool
run them; ``serve`` runs them from this process instead. Either way the schedules, triggers and limits
are Prefect's own: Strata adds no scheduler.

Entrypoints are module paths (``strata.flows.learn.learn``), so a worker imports the installed package and
nothing is pulled or baked into an image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from strata.models.errors import UserError

PREFECT_FILE = "prefect.yaml"
LEARNER_VAR = "STRATA_LEARNER"
WORKSPACE_VAR = "STRATA_WORKSPACE"
PLACEHOLDER = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")


class DeploymentError(UserError, ValueError):
    """The deployments cannot be declared or applied as asked; the message says what to fix."""


@dataclass(frozen=True)
class Declared:
    """One rendered entry of ``prefect.yaml``: ``flow_name/name`` on the Prefect API."""

    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def full_name(self) -> str:
        """``flow/deployment`` as ``prefect deployment run`` takes it (``strata.flows.learn.learn`` → ``learn/...``)."""
        return f"{load_flow(self.spec['entrypoint']).name}/{self.name}"

    @property
    def pool(self) -> dict[str, Any]:
        return self.spec.get("work_pool") or {}


def project_file(workspace: Path) -> Path:
    """The workspace's own ``prefect.yaml`` when it has one, else the one at Strata's root."""
    for candidate in (workspace / PREFECT_FILE, Path(__file__).resolve().parents[2] / PREFECT_FILE):
        if candidate.is_file():
            return candidate
    raise DeploymentError(
        f"no {PREFECT_FILE} in {workspace} or beside the strata package; copy the project's "
        f"{PREFECT_FILE} into the workspace"
    )


def declared_entries(path: Path) -> list[dict[str, Any]]:
    """The ``deployments`` list of a prefect.yaml, checked for what every entry needs."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path} is not valid YAML ({exc}); fix it") from exc
    entries = document.get("deployments") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DeploymentError(f"{path} declares no deployments (a top-level `deployments:` list)")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("entrypoint"):
            raise DeploymentError(f"{path}: deployment #{index + 1} needs a `name` and an `entrypoint`")
    return entries


def render(value: Any, values: dict[str, str]) -> Any:
    """Fill ``{{ $NAME }}`` placeholders from ``values``; an unknown name is an error, not an empty string."""
    if isinstance(value, dict):
        return {render(k, values): render(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, values) for v in value]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise DeploymentError(
                f"prefect.yaml uses {{{{ ${match.group(1)} }}}}, which Strata does not fill; "
                f"use only ${LEARNER_VAR} and ${WORKSPACE_VAR}"
            )
        return values[match.group(1)]

    return PLACEHOLDER.sub(fill, value)


def per_learner(entry: dict[str, Any]) -> bool:
    return LEARNER_VAR in PLACEHOLDER.findall(yaml.safe_dump(entry))


def declare(entries: list[dict[str, Any]], learners: list[str], workspace: Path) -> list[Declared]:
    """Render every entry; those naming the learner once per learner (none when ``learners`` is empty)."""
    declared = []
    for entry in entries:
        for learner in learners if per_learner(entry) else [None]:
            values = {WORKSPACE_VAR: str(workspace)} | ({LEARNER_VAR: learner} if learner else {})
            declared.append(Declared(render(entry, values)))
    return declared


def runner_deployment(item: Declared, served: bool = False):
    """The Prefect ``RunnerDeployment`` of one rendered entry; ``served``: for ``serve``, without a pool."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    spec = item.spec
    flow = load_flow(spec["entrypoint"])
    limit = spec.get("concurrency_limit")
    return flow.to_deployment(
        name=item.name,
        parameters=spec.get("parameters") or {},
        schedules=[_schedule(s) for s in spec.get("schedules") or []],
        triggers=[DeploymentEventTrigger.model_validate(t) for t in spec.get("triggers") or []],
        concurrency_limit=ConcurrencyLimitConfig.model_validate(limit) if isinstance(limit, dict) else limit,
        description=spec.get("description"),
        tags=spec.get("tags"),
        work_pool_name=None if served else item.pool.get("name"),
        work_queue_name=None if served else item.pool.get("work_queue_name"),
        job_variables=None if served else item.pool.get("job_variables") or {},
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def load_flow(entrypoint: str):
    """The flow object an entrypoint names, with a clear error for a typo."""
    from prefect.exceptions import PrefectException
    from prefect.flows import load_flow_from_entrypoint

    try:
        return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    except (ImportError, AttributeError, ValueError, PrefectException) as exc:
        raise DeploymentError(f"prefect.yaml entrypoint {entrypoint!r} cannot be loaded ({exc})") from exc


def _schedule(spec: dict[str, Any]):
    from prefect.schedules import Cron, Interval, RRule

    options = {k: spec[k] for k in ("timezone", "active", "parameters", "slug") if k in spec}
    if "cron" in spec:
        return Cron(spec["cron"], day_or=spec.get("day_or", True), **options)
    if "interval" in spec:
        return Interval(spec["interval"], anchor_date=spec.get("anchor_date"), **options)
    if "rrule" in spec:
        return RRule(spec["rrule"], **options)
    raise DeploymentError(f"a schedule in prefect.yaml needs cron, interval or rrule: {spec}")


def ensure_pool(name: str) -> None:
    """Create the work pool as a process pool when it is missing; an existing pool is left as it is."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def apply_to_pool(declared: list[Declared], pool: str | None) -> list[str]:
    """Create or update the deployments on the Prefect API for the workers of ``pool``; their ids.

    ``RunnerDeployment.apply`` is what ``prefect.deploy`` calls per deployment, without its image build
    (module entrypoints need none) and without its worker look-up, which 3.8.8's sync client sends
    malformed.
    """
    pools: list[str] = []
    for item in declared:
        name = pool or item.pool.get("name")
        if not name:
            raise DeploymentError(f"deployment {item.full_name!r} names no work pool; pass --pool")
        pools.append(name)
    for name in dict.fromkeys(pools):
        ensure_pool(name)
    return [str(runner_deployment(item).apply(work_pool_name=name)) for item, name in zip(declared, pools, strict=True)]
