"""The stream and report stages of the root DVC pipeline (``dvc.yaml``); the benchmark stage is the ``benchmark`` flow.

``python -m strata.cli.pipeline stream`` writes the task split the benchmark will run (so a change of
dataset, protocol or class order shows in ``dvc status`` as a changed stream), and ``python -m
strata.cli.pipeline report`` turns metrics.json into the per-task table that ``dvc plots`` draws.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from strata.models.streams import split_by_classes
from strata.tasks.data.readers import read_dataset

OUT = Path("runs/dvc")


def stream(params: dict) -> Path:
    dataset = read_dataset(params["dataset"], seed=params["seed"])
    tasks = split_by_classes(
        dataset, params["base"], params["increment"], params.get("class_order", "seeded"), params["seed"]
    )
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "stream.json"
    path.write_text(
        json.dumps(
            {
                "dataset": dataset.name,
                "protocol": f"B{params['base']}-Inc{params['increment']}",
                "tasks": [{"classes": list(t.class_names), "train": len(t.train), "test": len(t.test)} for t in tasks],
            },
            indent=2,
        )
    )
    return path


def report(params: dict) -> Path:
    """The per-task table of the run the benchmark stage wrote (``OUT/<method>/seed-<seed>``, as the flow lays out)."""
    metrics = json.loads((OUT / params["method"] / f"seed-{params['seed']}" / "metrics.json").read_text())
    rows = [
        {"task": t + 1, "accuracy": round(100 * a, 2), "task_averaged": round(100 * m, 2)}
        for t, (a, m) in enumerate(zip(metrics["accuracy"], metrics["task_averaged_accuracy"], strict=True))
    ]
    path = OUT / "accuracy_per_task.json"
    path.write_text(json.dumps(rows, indent=2))
    return path


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    if stage == "stream":
        print(stream(yaml.safe_load(Path("params.yaml").read_text())["benchmark"]))
    elif stage == "report":
        print(report(yaml.safe_load(Path("params.yaml").read_text())["benchmark"]))
    else:
        sys.exit("usage: python -m strata.cli.pipeline stream|report")
