"""ONNX export of a method's whole inference graph, with a parity gate against PyTorch.

pixels in → logits (or LAE's ensemble probabilities) over all seen classes out, exported with the
dynamo exporter and a dynamic batch axis, checked by ``onnx.checker``, then run in onnxruntime on a
fixed batch: the export fails — and the caller registers nothing — unless the outputs match PyTorch
(fp32: max |Δ| ≤ 1e-4 and identical argmax; fp16: max |Δ| ≤ 5e-2 and ≥ 99.5 % argmax agreement).
Next to ``model.onnx`` go ``labels.json`` (index → class name) and ``model.json`` (what it is).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from strata.models.errors import UserError
from strata.models.methods.base import Method
from strata.models.preprocessing import PreprocessedModel
from strata.tasks.export.layout import LABELS_FILE, META_FILE, MODEL_FILE
from strata.tasks.serving.providers import create_session

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2  # half precision keeps ~3 significant digits; logits of O(1) differ by ~1e-3
FP16_MIN_AGREEMENT = 0.995
PARITY_BATCH = 8
MAX_IR_VERSION = 10  # onnxruntime 1.31 reads IR ≤ 13; the torch exporter writes 10


class ExportError(UserError, RuntimeError):
    """The graph could not be exported or failed its parity gate; nothing should be registered."""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    argmax_agreement: float
    tolerance: float
    batch: int
    provider: str


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    model_path: Path
    parity: Parity
    meta: dict


def export_method(
    method: Method,
    out: str | Path,
    opset: int = 18,
    fp16: bool = False,
    preprocess_hw: tuple[int, int] | None = None,
    extra_meta: dict | None = None,
) -> ExportResult:
    """Export ``method`` to ``out/model.onnx`` and gate it on parity; raises ExportError on failure."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = method.backbone.image_size
    module = method.export_module().eval().cpu()
    if preprocess_hw is not None:
        module = PreprocessedModel(module, method.config.transforms, size, preprocess_hw).eval()
    example = _parity_batch(size, preprocess_hw)
    path = out / MODEL_FILE
    _export(module, example, path, opset)
    if fp16:
        _convert_fp16(path)
    onnx.checker.check_model(str(path), full_check=True)
    parity = check_parity(module, path, example, fp16)
    meta = {
        "method": method.name,
        "backbone": asdict(method.backbone.info),
        "input": {"dtype": "uint8", "layout": "NHWC", "shape": ["batch", *preprocess_hw, 3]}
        if preprocess_hw
        else {"dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, size, size], "range": [0, 1]},
        "output": {
            "name": "logits",
            "classes": method.num_seen,
            "kind": "probabilities" if method.outputs_probabilities else "logits",
        },
        "image_size": size,
        "transforms": method.config.transforms.model_dump(mode="json"),
        "opset": opset,
        "precision": "fp16" if fp16 else "fp32",
        "parity": asdict(parity),
        **(extra_meta or {}),
    }
    (out / LABELS_FILE).write_text(json.dumps(dict(enumerate(method.class_names)), indent=2))
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return ExportResult(out, path, parity, meta)


def _parity_batch(size: int, preprocess_hw: tuple[int, int] | None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if preprocess_hw is not None:
        return torch.randint(0, 256, (PARITY_BATCH, *preprocess_hw, 3), dtype=torch.uint8, generator=generator)
    return torch.rand(PARITY_BATCH, 3, size, size, generator=generator)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=({0: "batch"},),
            input_names=["pixels"],
            output_names=["logits"],
            verbose=False,
        )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {exc}") from exc
    if program is None:  # only the TorchScript exporter (dynamo=False) returns None
        raise ExportError(f"torch.onnx.export returned no ONNX program for {type(module).__name__}")
    model = program.model_proto
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save_model(model, str(path))


def _convert_fp16(path: Path) -> None:
    """Half-precision weights and compute with fp32 inputs/outputs.

    Goes through onnxruntime's transformer optimizer (no fusions) because the bare float16 converter
    leaves the graph unsorted and ``onnx.checker`` rejects it.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # shape-inference chatter
    optimized = optimize_model(str(path), model_type="vit", num_heads=0, hidden_size=0, opt_level=0, use_gpu=False)
    optimized.convert_float_to_float16(keep_io_types=True)
    optimized.save_model_to_file(str(path))


def check_parity(module: torch.nn.Module, path: Path, example: torch.Tensor, fp16: bool = False) -> Parity:
    """Run both on ``example``; raise ExportError when they disagree beyond the bound."""
    session = create_session(path)
    with torch.inference_mode():
        expected = module(example).float().numpy()
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0].astype(np.float32)
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    agreement = float(np.mean(got.argmax(1) == expected.argmax(1)))
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    min_agreement = FP16_MIN_AGREEMENT if fp16 else 1.0
    parity = Parity(diff, agreement, tolerance, len(example), session.get_providers()[0])
    if diff > tolerance or agreement < min_agreement:
        raise ExportError(
            f"parity gate failed: max |Δ| {diff:.3g} (bound {tolerance:g}), argmax agreement "
            f"{agreement:.1%} (need ≥ {min_agreement:.1%}); the model was not registered"
        )
    return parity
