"""The class-incremental benchmark: one method over a B{base}-Inc{increment} stream."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from strata.models.backbones import build_backbone
from strata.models.distributed import init_distributed, is_main_process
from strata.models.engine import Engine, seed_everything
from strata.models.evaluation import evaluate
from strata.models.methods import create_method, method_config
from strata.models.metrics import accuracy_matrix, confusion_matrix, summarize
from strata.models.streams import split_by_classes
from strata.tasks.data.readers import read_dataset
from strata.tasks.tracking.reports import write_report


class BenchmarkParams(BaseModel):
    """What ``strata benchmark`` runs; typed so a Prefect deployment renders it as a form."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("digits", description="digits, cifar100:DIR, folder:DIR or synthetic[:N]")
    method: str = Field("simplecil", description="a registered method name (strata methods)")
    base: int = Field(0, ge=0, description="classes in the first task; 0 means one increment")
    increment: int = Field(2, gt=0, description="classes per later task")
    backbone: str = Field("tiny", description="tiny (random-init) or a timm ViT name")
    weights: str | None = Field(None, description="local weights file for the backbone")
    class_order: Literal["seeded", "natural"] = "seeded"
    seed: int = Field(1993, description="class-order and training seed (APER's default 1993)")
    epochs: int | None = Field(None, ge=0, description="override the method's training epochs")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="test share where the data has no split")
    device: str | None = None
    out: Path = Path("runs/benchmark")
    overrides: dict[str, Any] = Field(default_factory=dict, description="nested method-config overrides")


TaskCallback = Callable[[int, dict], None]


def run_benchmark(params: BenchmarkParams, on_task: TaskCallback | None = None, show_progress: bool = True) -> dict:
    """Learn every task in order, evaluate on all seen tasks after each, write the report.

    Returns the metrics written to ``out/metrics.json``. ``on_task(t, summary_so_far)`` is called
    after each task (the CLI prints a table row from it).

    Under ``torchrun --nproc_per_node N`` every process runs this, training data-parallel (see
    ``strata.models.engine``); only rank 0 reports and writes.
    """
    init_distributed()
    seed_everything(params.seed)
    overrides = dict(params.overrides)
    if params.epochs is not None:
        overrides.setdefault("train", {})["epochs"] = params.epochs
    config = method_config(params.method, overrides)  # fails early on unknown names or bad overrides
    dataset = read_dataset(params.dataset, seed=params.seed, test_fraction=params.test_fraction)
    stream = split_by_classes(dataset, params.base, params.increment, params.class_order, params.seed)
    backbone = build_backbone(params.backbone, params.weights)
    method = create_method(params.method, backbone, config=config)
    engine = Engine(params.device, seed=params.seed, show_progress=show_progress and is_main_process())

    rows, losses, times = [], [], []
    for task in stream:
        started = time.perf_counter()
        losses.append(method.learn(task, engine))
        result = evaluate(method, stream.tasks[: task.index + 1], engine)
        times.append(time.perf_counter() - started)
        rows.append(result.accuracies)
        if on_task is not None and is_main_process():
            on_task(task.index, summarize(accuracy_matrix(rows), _sizes(stream, task.index)))

    metrics = summarize(accuracy_matrix(rows), _sizes(stream, len(stream) - 1))
    metrics.update(
        method=method.name,
        config=config.model_dump(mode="json"),
        dataset=dataset.name,
        protocol=f"B{params.base}-Inc{params.increment}",
        class_order=list(stream.class_names),
        seed=params.seed,
        backbone={
            "name": backbone.info.name,
            "source": backbone.info.source,
            "random_init": backbone.info.random_init,
            "fingerprint": backbone.info.fingerprint,
        },
        task_classes=[list(t.class_names) for t in stream],
        train_losses=losses,
        task_seconds=times,
        confusion_matrix=confusion_matrix(result.labels, result.predictions, method.num_seen).tolist(),
    )
    if is_main_process():
        write_report(params.out, metrics, f"{method.name} on {dataset.name} B{params.base}-Inc{params.increment}")
    return metrics


def _sizes(stream, last: int) -> np.ndarray:
    return np.array([len(t.test) for t in stream.tasks[: last + 1]])
