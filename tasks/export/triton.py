"""A Triton Inference Server model repository for GPU serving at scale.

Layout: ``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/<version>/model.onnx``, served by Triton's
onnxruntime backend with dynamic batching and, optionally, the TensorRT accelerator.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx

ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
}
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _tensor(value_info) -> tuple[str, str, list[int]]:
    kind = value_info.type.tensor_type
    dims = [d.dim_value if d.dim_value else -1 for d in kind.shape.dim][1:]  # Triton drops the batch axis
    return value_info.name, ONNX_TO_TRITON[kind.elem_type], dims


def triton_config(
    model_path: Path, name: str, max_batch_size: int = 32, tensorrt: bool = False, max_queue_delay_us: int = 2000
) -> str:
    """config.pbtxt text for one ONNX model."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}"]
    for section, values in (("input", graph.input), ("output", graph.output)):
        entries = []
        for value in values:
            tensor, dtype, dims = _tensor(value)
            entries.append(f'  {{ name: "{tensor}", data_type: {dtype}, dims: [ {", ".join(map(str, dims))} ] }}')
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    preferred = [b for b in (4, 8, 16, 32) if b <= max_batch_size]
    lines.append(
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}"
    )
    lines.append("instance_group [ { kind: KIND_GPU, count: 1 } ]")
    if tensorrt:
        lines.append(
            "optimization { execution_accelerators { gpu_execution_accelerator : [ {\n"
            '  name : "tensorrt"\n  parameters { key: "precision_mode" value: "FP16" }\n} ] } }'
        )
    return "\n".join(lines) + "\n"


def write_triton_repository(
    model_path: Path, repository: Path, name: str, version: int = 1, max_batch_size: int = 32, tensorrt: bool = False
) -> Path:
    """Copy the model into ``repository/name/version/`` and write its config; returns the model folder."""
    if not SAFE_NAME.match(name):
        raise ValueError(f"Triton model name {name!r} must match {SAFE_NAME.pattern}")
    folder = repository / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, folder / str(version) / "model.onnx")
    (folder / "config.pbtxt").write_text(triton_config(model_path, name, max_batch_size, tensorrt))
    return folder
