"""Serving latency (p50/p99) and throughput: onnxruntime vs PyTorch eager on the same model, as JSON.

The model is SimpleCIL over two synthetic tasks (built, not trained: the cost of a forward does not
depend on the learned values), exported with ``export_method`` (so it passed the parity gate) and run
in the session the server uses (``strata.tasks.serving.providers.create_session``); PyTorch runs ``export_module()``,
the very module that was exported. Both take a host (CPU) batch per call, so on a GPU both pay the
copy to the device. Per batch size: per-call latency percentiles and images/s, and the ratios
onnxruntime / PyTorch (latency < 1 and throughput > 1 mean onnxruntime is faster).

    python -m benchmarks.serving [--backbone vit_base_patch16_224.augreg_in21k --iterations 10]
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from benchmarks import common
from strata.models.methods import create_method
from strata.tasks.export.onnx_graph import export_method
from strata.tasks.serving.providers import create_session

BATCH_SIZES = (1, 8, 32)


def timings(call: Callable[[], object], iterations: int, warmup: int) -> dict:
    milliseconds = np.array(common.call_seconds(call, iterations, warmup)) * 1000
    return {
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 3),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 3),
        "mean_ms": round(float(milliseconds.mean()), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100, help="timed calls per batch size and backend")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    args = parser.parse_args(argv)
    common.setup(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = create_method("simplecil", common.backbone(args.backbone))
    size = method.backbone.image_size
    for task in common.synthetic_tasks(2, 5, 10, size):
        method.begin_task(task)
    method.eval()
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        session = create_session(export_method(method, directory).model_path, threads=args.threads)
        module = method.export_module().to(device)
        name = session.get_inputs()[0].name
        for batch in args.batch_sizes:
            print(f"batch {batch} …", file=sys.stderr)
            pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            feed = {name: pixels.numpy()}

            def eager(pixels: torch.Tensor = pixels) -> None:
                with torch.inference_mode():
                    module(pixels.to(device)).cpu()

            ort = timings(lambda feed=feed: session.run(None, feed), args.iterations, args.warmup)
            pt = timings(eager, args.iterations, args.warmup)
            results[str(batch)] = {
                "onnxruntime": {**ort, "images_per_s": round(batch * 1000 / ort["mean_ms"], 1)},
                "torch_eager": {**pt, "images_per_s": round(batch * 1000 / pt["mean_ms"], 1)},
                "ratio_ort_over_torch": {
                    "p50_latency": common.ratio(ort["p50_ms"], pt["p50_ms"]),
                    "p99_latency": common.ratio(ort["p99_ms"], pt["p99_ms"]),
                    "throughput": common.ratio(pt["mean_ms"], ort["mean_ms"]),
                },
            }
        provider = session.get_providers()[0]
    document = {
        "benchmark": "serving",
        "model": f"simplecil on {args.backbone} (random-init weights)",
        "image_size": size,
        "classes": method.num_seen,
        "iterations": args.iterations,
        "torch_device": str(device),
        "onnxruntime_provider": provider,
        "machine": common.machine(),
        "batches": results,
    }
    common.emit(document)
    return document


if __name__ == "__main__":
    main()
