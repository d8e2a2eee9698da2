"""The ``benchmark`` flow: several methods on the same stream, one MLflow run each, one comparison table.

Each method runs the plain benchmark (flows/benchmark.py) on the same dataset, protocol, class order
and seed; its run logs the method config as params, A_t / forgetting at step = task index, and the
report files. The comparison is printed, returned and published as a Prefect table artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency
from pydantic import Field

from flows.benchmark import BenchmarkParams, run_benchmark
from tasks import tracking
from tasks.artifacts import artifact_key
from tasks.deployments import GPU_LIMIT
from tasks.reports import CURVE_FILE, MATRIX_FILE, METRICS_FILE
from tasks.settings import load_settings


class CompareParams(BenchmarkParams):
    """The benchmark's parameters, with a list of methods instead of one."""

    methods: list[str] = Field(default_factory=lambda: ["simplecil", "finetune"], min_length=1)
    workspace: str | None = Field(None, description="whose MLflow store to log to; default the current folder")


@task(name="benchmark-method", cache_policy=NONE)
def benchmark_method(params: CompareParams, method: str, experiment_id: str) -> dict[str, Any]:
    single = BenchmarkParams(**{**params.model_dump(exclude={"methods", "workspace"}), "method": method,
                                "out": params.out / method})
    with mlflow.start_run(experiment_id=experiment_id, run_name=method, tags={"strata.method": method}):
        with concurrency(GPU_LIMIT, occupy=1, strict=False):  # training holds a `gpu` slot, as in learn
            metrics = run_benchmark(single, show_progress=False)
        mlflow.log_params({k: str(v)[:6000] for k, v in tracking.flatten("", {
            "method": method, "config": metrics["config"], "dataset": params.dataset,
            "protocol": metrics["protocol"], "backbone": params.backbone, "seed": params.seed}).items()})
        for step, (accuracy, forgetting) in enumerate(zip(metrics["accuracy"], metrics["forgetting"], strict=True)):
            mlflow.log_metrics({"accuracy": accuracy, "forgetting": forgetting}, step=step)
        mlflow.log_metric("average_incremental_accuracy", metrics["average_incremental_accuracy"])
        for name in (METRICS_FILE, CURVE_FILE, MATRIX_FILE):
            mlflow.log_artifact(str(single.out / name))
    return metrics


@flow(name="benchmark")
def compare(params: CompareParams) -> list[dict[str, Any]]:
    """Run every method of ``params.methods`` on one stream; returns one comparison row per method."""
    settings = load_settings(params.workspace or Path.cwd())
    client = tracking.configure(settings)
    name = f"strata/benchmark/{params.dataset.split(':')[0]}-B{params.base}-Inc{params.increment}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    rows = []
    for method in params.methods:
        metrics = benchmark_method(params, method, experiment_id)
        rows.append({"method": method, "final_accuracy": round(100 * metrics["final_accuracy"], 2),
                     "average_incremental_accuracy": round(100 * metrics["average_incremental_accuracy"], 2),
                     "final_forgetting": round(100 * metrics["final_forgetting"], 2),
                     "task_averaged_final": round(100 * metrics["task_averaged_accuracy"][-1], 2)})
    create_table_artifact(rows, key=artifact_key("benchmark", params.dataset.split(":")[0]),
                          description=f"{name}: methods compared on the same stream")
    return rows
