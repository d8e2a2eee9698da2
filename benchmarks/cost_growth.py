"""Cost growth over a 10-task stream: per-task training time, inference time and state size vs task index.

A synthetic 10-task stream of random pre-transformed images (tiny ViT by default) is learned with
short epochs. Per task: wall time of the increment (``Method.learn``), median
inference time of a fixed test batch over all classes seen, and the bytes of ``state.safetensors``.
The baseline of the same run is one frozen-backbone pass over the task's training images, whose cost
does not grow; ``train_vs_baseline`` divides each task's training time by it, which cancels slow drifts
in the machine's load. Targets: task 10 / task 1 ≤ 1.1 for training time, inference cost constant.

    python -m benchmarks.cost_growth
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from strata.models.methods import create_method
from strata.models.methods.base import STATE_TENSORS

METHODS = ["simplecil", "lae_adapter", "ovor"]


def short(name: str, epochs: int, batch_size: int) -> dict:
    """Short epochs; OVOR keeps one VOR epoch so its per-task feature pass is measured too."""
    result = {"train": {"epochs": epochs, "batch_size": batch_size}}
    if name.startswith("lae_"):
        result["freeze_epochs"] = 1
    if name == "ovor":
        result["vor_epochs"] = 1
    return result


def growth(rows: list[dict], key: str) -> dict:
    return {
        "last_vs_first": common.ratio(rows[-1][key], rows[0][key]),
        "last_vs_second": common.ratio(rows[-1][key], rows[1][key]) if len(rows) > 1 else None,
    }


def run_method(name: str, backbone, stream, pixels: torch.Tensor, epochs: int, batch_size: int, repeats: int) -> dict:
    method = create_method(name, backbone, overrides=short(name, epochs, batch_size))
    engine = common.engine()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for task in stream:
            start = time.perf_counter()
            method.learn(task, engine)
            train_s = time.perf_counter() - start
            method.eval()
            with torch.inference_mode():
                infer_s = common.median_seconds(lambda: method(pixels), repeats)
            state = method.save_state(Path(directory) / f"task{task.index}")
            baseline_s = common.median_seconds(
                lambda task=task: engine.extract(
                    backbone, task.train.with_transform(method.test_transform()), batch_size
                ),
                1,
            )
            rows.append(
                {
                    "task": task.index + 1,
                    "train_s": round(train_s, 4),
                    "inference_s": round(infer_s, 5),
                    "state_bytes": (state / STATE_TENSORS).stat().st_size,
                    "baseline_s": round(baseline_s, 4),
                    "train_vs_baseline": common.ratio(train_s, baseline_s),
                }
            )
    return {
        "tasks": rows,
        "train_s": growth(rows, "train_s"),
        "inference_s": growth(rows, "inference_s"),
        "state_bytes": growth(rows, "state_bytes"),
        "baseline_s": growth(rows, "baseline_s"),
        "train_vs_baseline": growth(rows, "train_vs_baseline"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images-per-task", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    common.setup(args)
    backbone = common.backbone(args.backbone)
    size = backbone.image_size
    stream = common.synthetic_tasks(args.tasks, 2, args.images_per_task, size)
    pixels = torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(1))
    results = {
        name: run_method(name, backbone, stream, pixels, args.epochs, args.batch_size, args.repeats)
        for name in args.methods
    }
    document = {
        "benchmark": "cost_growth",
        "machine": common.machine(),
        "config": {
            "backbone": args.backbone,
            "image_size": size,
            "tasks": len(stream),
            "classes_per_task": 2,
            "images_per_task": args.images_per_task,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "inference_batch": len(pixels),
            "weights": "random-init",
            "baseline": "frozen-backbone pass over the task's training images",
        },
        "methods": results,
    }
    common.emit(document)
    return document


if __name__ == "__main__":
    main()
