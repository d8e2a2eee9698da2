"""Platform overhead: one increment through ``flows.learn`` (Prefect + MLflow + DVC + ledger) against the
bare method call on the same data, measured in the same run.

The baseline is what the flow does that is learning proper: ``method.learn`` on the batch and
``evaluate`` on its test split, with the data already in memory. The flow adds materialising through
DVC (md5 check), the ledger, MLflow logging and registration, the gate and the Prefect task runs. A
temporary workspace is made per repeat and one digits batch ingested (not timed); the Prefect server is
the temporary local one, started before timing.

    python -m benchmarks.platform_overhead --repeats 3
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks import common
from models.engine import Engine, seed_everything
from models.evaluation import evaluate
from models.methods import create_method
from models.streams import stream_from_batches


def bare_seconds(method_name: str, backbone_name: str, batch: Path) -> float:
    """Learn and evaluate the batch directly (in memory, no stores)."""
    from tasks.datasets import read_image_folder

    dataset = read_image_folder(str(batch), 0, 0.25)
    stream = stream_from_batches("bare", [dataset])
    seed_everything(0)
    method = create_method(method_name, common.backbone(backbone_name))
    engine = Engine("cpu", show_progress=False)
    started = time.perf_counter()
    method.learn(stream.tasks[0], engine)
    evaluate(method, stream.tasks, engine)
    return time.perf_counter() - started


def flow_seconds(method_name: str, backbone_name: str, batch: Path) -> float:
    """The same increment through the learn flow in a fresh workspace (ingest not timed)."""
    from flows.learn import LearnParams, learn
    from tasks.ingest import ingest
    from tasks.settings import load_settings
    from tasks.workspace import init_workspace

    with tempfile.TemporaryDirectory(prefix="strata-overhead-") as folder:
        workspace = Path(folder) / "ws"
        init_workspace(workspace)
        ingest(load_settings(workspace), batch, "bench")
        started = time.perf_counter()
        learn(LearnParams(learner="bench", method=method_name, backbone=backbone_name, workspace=str(workspace),
                          show_progress=False))
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--method", default="simplecil")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    common.setup(args)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from tasks.demo_data import write_digit_batches

    with tempfile.TemporaryDirectory(prefix="strata-overhead-data-") as data, \
            prefect_test_harness(server_startup_timeout=60):
        batch = write_digit_batches(Path(data))[0]
        flow_seconds(args.method, args.backbone, batch)  # warm-up: imports, MLflow's first schema creation
        bare = [bare_seconds(args.method, args.backbone, batch) for _ in range(args.repeats)]
        flowed = [flow_seconds(args.method, args.backbone, batch) for _ in range(args.repeats)]
    bare_s, flow_s = sorted(bare)[len(bare) // 2], sorted(flowed)[len(flowed) // 2]
    common.emit({
        "benchmark": "platform_overhead", "machine": common.machine(),
        "config": {"method": args.method, "backbone": args.backbone, "batch": "digits classes 0-1",
                   "repeats": args.repeats},
        "baseline": {"what": "bare method.learn + evaluate, data in memory", "seconds": bare_s},
        "methods": {args.method: {"flow_seconds": flow_s, "overhead_seconds": flow_s - bare_s,
                                  "flow_vs_baseline": common.ratio(flow_s, bare_s),
                                  "overhead_fraction_of_flow": common.ratio(flow_s - bare_s, flow_s)}},
    })


if __name__ == "__main__":
    main()
