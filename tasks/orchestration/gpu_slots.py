"""The ``gpu`` global concurrency limit: training processes across every flow run take slots of it.

One helper for ``learn`` and the benchmark flow, so the slots a run takes always match the processes it
starts; ``strata deploy --gpu-slots N`` sets the limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from strata.tasks.orchestration.deployments import DeploymentError

GPU_LIMIT = "gpu"


def ensure_limit(name: str, slots: int | None) -> None:
    """Create the global concurrency limit ``name`` (e.g. ``gpu``: training processes at once), or resize it.

    ``slots`` None keeps an existing limit as it is (it may have been set in the UI) and creates a
    missing one with a single slot.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    if slots is not None and slots < 1:
        raise DeploymentError(f"a concurrency limit needs at least one slot, not {slots}")
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots or 1))
            return
        if slots is not None and (current.limit != slots or not current.active):
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots, active=True))


@contextmanager
def gpu_slots(count: int = 1) -> Iterator[None]:
    """Hold ``count`` slots of the ``gpu`` global concurrency limit while training; no limit, no wait.

    The limit is read first (a cheap GET): without one (``strata deploy`` creates it) nothing is acquired,
    which saves the acquisition's write on the Prefect server (about 2 s per increment on a busy SQLite
    server, ``benchmarks/platform_overhead.py``) and Prefect's "does not exist" warning. A limit smaller
    than ``count`` could never be satisfied: that is an error saying how to raise it.
    """
    from prefect import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            limit = None
    if limit is None or not limit.active:
        yield
        return
    if count > limit.limit:
        raise DeploymentError(
            f"{count} training processes need {count} slots of the `{GPU_LIMIT}` concurrency "
            f"limit, which has {limit.limit}; raise it: strata deploy --gpu-slots {count}"
        )
    with concurrency(GPU_LIMIT, occupy=count, strict=True):
        yield
