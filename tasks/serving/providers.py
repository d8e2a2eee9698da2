"""onnxruntime execution providers: decided from what is usable, read back from the session.

onnxruntime-gpu lists CUDA and TensorRT as *available* even on machines without a GPU, prints an
error and silently runs on the CPU. So CUDA is only asked for when a CUDA device is actually visible,
and the provider a session really uses is always taken from ``session.get_providers()``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

logger = logging.getLogger(__name__)


def cuda_usable() -> bool:
    """A CUDA device is visible to this process (torch's probe; no onnxruntime error spam)."""
    import torch

    return torch.cuda.is_available()


def preferred_providers(tensorrt: bool = False) -> list[str]:
    """TensorRT (when asked) then CUDA when a GPU is usable; the CPU always last."""
    available = set(ort.get_available_providers())
    providers = []
    if cuda_usable():
        if tensorrt and "TensorrtExecutionProvider" in available:
            providers.append("TensorrtExecutionProvider")
        if "CUDAExecutionProvider" in available:
            providers.append("CUDAExecutionProvider")
    return providers + ["CPUExecutionProvider"]


def create_session(path: str | Path, tensorrt: bool = False, threads: int | None = None) -> ort.InferenceSession:
    """An inference session on the best usable provider, logging the one actually in use."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=preferred_providers(tensorrt))
    logger.info("onnxruntime session for %s runs on %s", path, session.get_providers()[0])
    return session
