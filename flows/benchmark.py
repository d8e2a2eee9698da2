"""The ``benchmark`` flow: several methods (and seeds) on the same stream, one MLflow run each, one table.

Each (method, seed) runs the plain benchmark (flows/benchmark.py) on the same dataset, protocol and
class order; its run logs the method config as params, A_t / forgetting at step = task index, and the
report files. The comparison is printed, returned and published as a Prefect table artifact.

The runs are independent, so they fan out over a Dask cluster when asked (``prefect-dask``): an
existing scheduler's address in production, or a local cluster of worker processes. Each run seeds
itself, so the metrics do not depend on where or in which order it ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import Field

from strata.tasks.benchmarking.run import BenchmarkParams, run_benchmark
from strata.tasks.orchestration.artifacts import artifact_key
from strata.tasks.orchestration.gpu_slots import gpu_slots
from strata.tasks.tracking import runs
from strata.tasks.tracking.reports import CURVE_FILE, MATRIX_FILE, METRICS_FILE
from strata.tasks.workspace.settings import StrataSettings, load_settings


class CompareParams(BenchmarkParams):
    """The benchmark's parameters, with lists of methods and seeds, and where to run them."""

    methods: list[str] = Field(default_factory=lambda: ["simplecil", "finetune"], min_length=1)
    seeds: list[int] | None = Field(None, min_length=1, description="seeds to run each method with; default [seed]")
    dask_address: str | None = Field(
        None, description="scheduler of a running Dask cluster (tcp://host:8786): the runs fan out over its workers"
    )
    dask_workers: int = Field(
        0,
        ge=0,
        description="without an address: start a local Dask cluster of this many "
        "worker processes; 0 runs one after another in the flow's process",
    )
    workspace: str | None = Field(None, description="whose MLflow store to log to; default the current folder")

    def task_runner(self) -> TaskRunner:
        """Dask when asked (an address, else a local cluster), else one run at a time in this process."""
        if not (self.dask_address or self.dask_workers):
            return ThreadPoolTaskRunner(max_workers=1)  # runs share torch's global RNG: never two at once here
        from prefect_dask import DaskTaskRunner

        if self.dask_address:
            return DaskTaskRunner(address=self.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": self.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )


@task(name="benchmark-method", cache_policy=NONE)
def benchmark_method(
    params: CompareParams, method: str, seed: int, settings: StrataSettings, experiment_id: str
) -> dict[str, Any]:
    """One method with one seed; configures MLflow itself, since on Dask it runs in another process."""
    single = BenchmarkParams(
        **{
            **params.model_dump(exclude={"methods", "seeds", "dask_address", "dask_workers", "workspace"}),
            "method": method,
            "seed": seed,
            "out": params.out / method / f"seed-{seed}",
        }
    )
    runs.configure(settings)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"{method} seed {seed}",
        tags={"strata.method": method, "strata.seed": str(seed)},
    ):
        with gpu_slots():  # training holds a `gpu` slot, as in learn
            metrics = run_benchmark(single, show_progress=False)
        mlflow.log_params(
            {
                k: str(v)[:6000]
                for k, v in runs.flatten(
                    "",
                    {
                        "method": method,
                        "config": metrics["config"],
                        "dataset": params.dataset,
                        "protocol": metrics["protocol"],
                        "backbone": params.backbone,
                        "seed": seed,
                    },
                ).items()
            }
        )
        for step, (accuracy, forgetting) in enumerate(zip(metrics["accuracy"], metrics["forgetting"], strict=True)):
            mlflow.log_metrics({"accuracy": accuracy, "forgetting": forgetting}, step=step)
        mlflow.log_metric("average_incremental_accuracy", metrics["average_incremental_accuracy"])
        for name in (METRICS_FILE, CURVE_FILE, MATRIX_FILE):
            mlflow.log_artifact(str(single.out / name))
    return metrics


@flow(name="benchmark")
def benchmark(params: CompareParams) -> list[dict[str, Any]]:
    """Run every method of ``params.methods`` with every seed on one stream; one comparison row per run."""
    settings = load_settings(params.workspace or Path.cwd())
    client = runs.configure(settings)
    name = f"strata/benchmark/{params.dataset.split(':')[0]}-B{params.base}-Inc{params.increment}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    jobs = [(method, seed) for method in params.methods for seed in params.seeds or [params.seed]]
    with params.task_runner() as runner:
        futures = [
            runner.submit(
                benchmark_method,
                {
                    "params": params,
                    "method": method,
                    "seed": seed,
                    "settings": settings,
                    "experiment_id": experiment_id,
                },
            )
            for method, seed in jobs
        ]
        results = [future.result() for future in futures]
    rows = []
    for (method, seed), metrics in zip(jobs, results, strict=True):
        rows.append(
            {
                "method": method,
                "seed": seed,
                "final_accuracy": round(100 * metrics["final_accuracy"], 2),
                "average_incremental_accuracy": round(100 * metrics["average_incremental_accuracy"], 2),
                "final_forgetting": round(100 * metrics["final_forgetting"], 2),
                "task_averaged_final": round(100 * metrics["task_averaged_accuracy"][-1], 2),
            }
        )
    create_table_artifact(
        rows,
        key=artifact_key("benchmark", params.dataset.split(":")[0]),
        description=f"{name}: methods compared on the same stream",
    )
    return rows
