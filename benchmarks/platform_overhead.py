"""Platform overhead: one increment through ``strata.flows.learn`` (Prefect + MLflow + DVC + ledger) against the
bare method call on the same data, measured in the same run.

The baseline is what the flow does that is learning proper: ``method.learn`` on the batch and
``evaluate`` on its test split, with the data already in memory. The flow adds materialising through
DVC (md5 check), the ledger, MLflow logging and registration, the gate and the Prefect task runs. A
temporary workspace is made per repeat and one digits batch ingested (not timed); the Prefect server is
the temporary local one, started before timing.

Creating the workspace's embedded MLflow store (MLflow runs its whole alembic history on an empty SQLite
file) happens once per workspace, on its first use: it is timed apart (``one_time``) and left out of the
increment, which is what every later ``learn`` pays. The increment's Prefect task runs are read back from
the API, so the JSON also says where the platform's time goes (``tasks``, medians per task name).

    python -m benchmarks.platform_overhead --repeats 3
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from benchmarks import common
from strata.models.engine import Engine, seed_everything
from strata.models.evaluation import evaluate
from strata.models.methods import create_method
from strata.models.streams import stream_from_batches


def bare_seconds(method_name: str, backbone_name: str, batch: Path) -> float:
    """Learn and evaluate the batch directly (in memory, no stores)."""
    from strata.tasks.data.readers import read_image_folder

    dataset = read_image_folder(str(batch), 0, 0.25)
    stream = stream_from_batches("bare", [dataset])
    seed_everything(0)
    method = create_method(method_name, common.backbone(backbone_name))
    engine = Engine("cpu", show_progress=False)
    started = time.perf_counter()
    method.learn(stream.tasks[0], engine)
    evaluate(method, stream.tasks, engine)
    return time.perf_counter() - started


@dataclass
class FlowTiming:
    seconds: float
    store_creation_seconds: float
    tasks: dict[str, float]


def flow_seconds(method_name: str, backbone_name: str, batch: Path) -> FlowTiming:
    """The same increment through the learn flow in a fresh workspace (ingest and store creation not timed)."""
    from strata.flows.learn import LearnParams, learn
    from strata.tasks.data.ingest import ingest
    from strata.tasks.tracking import runs
    from strata.tasks.workspace.settings import load_settings
    from strata.tasks.workspace.setup import init_workspace

    with tempfile.TemporaryDirectory(prefix="strata-overhead-") as folder:
        workspace = Path(folder) / "ws"
        init_workspace(workspace)
        settings = load_settings(workspace)
        ingest(settings, batch, "bench")
        started = time.perf_counter()
        runs.configure(settings)
        store_creation = time.perf_counter() - started
        started = time.perf_counter()
        state = learn(
            LearnParams(
                learner="bench",
                method=method_name,
                backbone=backbone_name,
                workspace=str(workspace),
                show_progress=False,
            ),
            return_state=True,
        )
        seconds = time.perf_counter() - started
        state.result()  # raises if the flow failed: a failed run is not a timing
        return FlowTiming(seconds, store_creation, task_seconds(state.state_details.flow_run_id))


def task_seconds(flow_run_id) -> dict[str, float]:
    """Run time of each task run of the flow run, by task name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    totals: dict[str, float] = {}
    for run in runs:
        name = run.name.rsplit("-", 1)[0]
        totals[name] = totals.get(name, 0.0) + run.total_run_time.total_seconds()
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--method", default="simplecil")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    common.setup(args)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from strata.tasks.data.demo_batches import write_digit_batches

    with (
        tempfile.TemporaryDirectory(prefix="strata-overhead-data-") as data,
        prefect_test_harness(server_startup_timeout=60),
    ):
        batch = write_digit_batches(Path(data))[0]
        flow_seconds(args.method, args.backbone, batch)  # warm-up: imports, MLflow's first schema creation
        bare = [bare_seconds(args.method, args.backbone, batch) for _ in range(args.repeats)]
        flowed = [flow_seconds(args.method, args.backbone, batch) for _ in range(args.repeats)]
    bare_s, flow_s = median(bare), median([timing.seconds for timing in flowed])
    tasks = {name: round(median([timing.tasks.get(name, 0.0) for timing in flowed]), 3) for name in flowed[0].tasks}
    common.emit(
        {
            "benchmark": "platform_overhead",
            "machine": common.machine(),
            "config": {
                "method": args.method,
                "backbone": args.backbone,
                "batch": "digits classes 0-1",
                "repeats": args.repeats,
            },
            "baseline": {"what": "bare method.learn + evaluate, data in memory", "seconds": bare_s},
            "methods": {
                args.method: {
                    "flow_seconds": flow_s,
                    "overhead_seconds": flow_s - bare_s,
                    "flow_vs_baseline": common.ratio(flow_s, bare_s),
                    "overhead_fraction_of_flow": common.ratio(flow_s - bare_s, flow_s),
                    "tasks": tasks,
                    "outside_tasks_seconds": round(flow_s - sum(tasks.values()), 3),
                }
            },
            "one_time": {"mlflow_store_creation_seconds": median([t.store_creation_seconds for t in flowed])},
        }
    )


if __name__ == "__main__":
    main()
