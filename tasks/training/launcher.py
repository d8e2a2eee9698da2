"""One increment trained by several processes (one per GPU): torchrun's launcher, started from a flow.

``torch.distributed.launcher.api.elastic_launch`` is what the ``torchrun`` command runs. Each process
rebuilds the method from the learner's last state (a fresh one at task 0), joins the process group the
launcher describes (NCCL on GPUs, gloo on CPU), trains its share of every global batch (see
``strata.models.engine``), and rank 0 writes the trained state. The flow then continues from that state exactly
as if it had trained in-process: evaluation, tracking and registration do not know the difference.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strata.models.backbones import build_backbone
from strata.models.distributed import init_distributed, is_main_process
from strata.models.engine import Engine, seed_everything
from strata.models.methods import Method, create_method
from strata.models.streams import Task
from strata.tasks.training.feature_cache import DiskFeatureCache
from strata.tasks.training.restore import restore_method


@dataclass(frozen=True)
class TrainJob:
    """Everything a training process needs, picklable: it crosses into freshly spawned interpreters."""

    task: Task
    method: str
    backbone: str
    out: str
    weights: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    state: str | None = None  # the last increment's state directory; None at task 0
    seed: int = 0
    device: str | None = None
    feature_cache: str | None = None


def _build(job: TrainJob) -> Method:
    if job.state:
        return restore_method(job.state, job.weights)
    return create_method(job.method, build_backbone(job.backbone, job.weights), overrides=job.config)


def train_process(job: TrainJob) -> list[float]:
    """The body of every process: join the group, train the task, rank 0 saves the state."""
    init_distributed()
    seed_everything(job.seed)
    method = _build(job)
    engine = Engine(
        job.device,
        seed=job.seed,
        show_progress=is_main_process(),
        feature_cache=DiskFeatureCache(Path(job.feature_cache)) if job.feature_cache else None,
    )
    losses = method.learn(job.task, engine)
    if is_main_process():
        method.save_state(job.out)
    return losses


def train_on_processes(job: TrainJob, processes: int) -> tuple[Method, list[float]]:
    """Train ``job.task`` on ``processes`` local processes; the trained method (rebuilt here) and rank 0's losses."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    losses = elastic_launch(config, train_process)(job)[0]
    return restore_method(job.out, job.weights), losses
