"""Inference images/s per method in PyTorch eager and in onnxruntime, at batch 1 and a larger batch.

Methods are built on synthetic tasks 0 and 1 without training (inference cost does not depend on the
learned values): LAE then runs both experts, APER its two branches, OVOR one prompted forward and
SimpleCIL — the baseline of the same run — one plain forward. Ratios: each method against SimpleCIL
in the same backend, and onnxruntime against PyTorch for the same method and batch (the target is
≤ 0.8 in latency at batch 1 on CPU, i.e. ≥ 1.25 in images/s).

    python -m benchmarks.inference_throughput
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from benchmarks import common
from strata.models.methods import create_method
from strata.models.methods.base import Method
from strata.tasks.export.onnx_graph import export_method
from strata.tasks.serving.providers import create_session

METHODS = ["simplecil", "aper_adapter", "lae_adapter", "lae_prefix", "ovor"]
BASELINE = "simplecil"


def built(name: str, backbone, tasks) -> Method:
    method = create_method(name, backbone)
    for task in tasks:
        method.begin_task(task)
    return method.eval()


def torch_rate(method: Method, pixels: torch.Tensor, repeats: int) -> float:
    def run():
        with torch.inference_mode():
            method(pixels)

    return len(pixels) / common.median_seconds(run, repeats)


def onnx_rate(session, pixels: torch.Tensor, repeats: int) -> float:
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(pixels.numpy())}
    return len(pixels) / common.median_seconds(lambda: session.run(None, feed), repeats)


def measure(method: Method, batches: dict[str, torch.Tensor], repeats: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        session = create_session(export_method(method, directory).model_path, threads=threads)
        result = {}
        for label, pixels in batches.items():
            eager, ort = torch_rate(method, pixels, repeats), onnx_rate(session, pixels, repeats)
            result[label] = {
                "torch_images_per_s": round(eager, 2),
                "onnxruntime_images_per_s": round(ort, 2),
                "ort_vs_torch_latency": common.ratio(eager, ort),
                "provider": session.get_providers()[0],
            }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    common.setup(args)
    backbone = common.backbone(args.backbone)
    tasks = common.synthetic_tasks(2, 4, 8, backbone.image_size)
    generator = torch.Generator().manual_seed(1)
    size = backbone.image_size
    batches = {
        "batch_1": torch.rand(1, 3, size, size, generator=generator),
        f"batch_{args.batch_size}": torch.rand(args.batch_size, 3, size, size, generator=generator),
    }
    names = [BASELINE, *(n for n in args.methods if n != BASELINE)]
    results = {name: measure(built(name, backbone, tasks), batches, args.repeats, args.threads) for name in names}
    for per_batch in results.values():
        for label, figures in per_batch.items():
            reference = results[BASELINE][label]
            figures["torch_vs_simplecil"] = common.ratio(figures["torch_images_per_s"], reference["torch_images_per_s"])
            figures["ort_vs_simplecil"] = common.ratio(
                figures["onnxruntime_images_per_s"], reference["onnxruntime_images_per_s"]
            )
    document = {
        "benchmark": "inference_throughput",
        "machine": common.machine(),
        "config": {
            "backbone": args.backbone,
            "image_size": size,
            "repeats": args.repeats,
            "weights": "random-init",
            "baseline": BASELINE,
        },
        "methods": results,
    }
    common.emit(document)
    return document


if __name__ == "__main__":
    main()
