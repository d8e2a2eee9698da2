"""One exported model ready to serve: its onnxruntime session, class names and input pipeline.

Everything a request needs is derived from the export's own ``model.json``, so a reloaded model of
another method, size or preprocessing is served correctly without restarting: float graphs get the
method's test transform (the very ``strata.models.transforms.test_transform`` used in PyTorch, built from
the recorded ``TransformConfig`` and image size); graphs exported with preprocessing (uint8 NHWC)
get the image resized to their fixed input size. Loading runs one warm-up batch and checks the output
against ``labels.json``, so a broken or inconsistent export is refused before it is swapped in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from strata.models.errors import UnavailableError
from strata.models.images import ImageError, ImageTooLargeError, ImageUnreadableError, decode, read_header
from strata.models.transforms import TransformConfig, test_transform
from strata.tasks.export.layout import LABELS_FILE, MANIFEST_FILE, META_FILE, MODEL_FILE, manifest_problem
from strata.tasks.serving.providers import create_session, preferred_providers
from strata.tasks.serving.sources import ModelRef

logger = logging.getLogger(__name__)
PIL_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ModelLoadError(UnavailableError, RuntimeError):
    """An export directory cannot be served (unreadable, inconsistent, or the graph fails to run)."""


class RequestError(ValueError):
    """A client's input is unusable; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class LoadedModel:
    ref: ModelRef
    session: ort.InferenceSession
    labels: list[str]
    meta: dict[str, Any]
    image_shape: tuple[int, ...]  # one image as the graph takes it: (3, S, S) float or (H, W, 3) uint8
    dtype: np.dtype
    outputs_probabilities: bool
    transform: Callable[[Image.Image], np.ndarray] = field(repr=False)
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def provider(self) -> str:
        """The execution provider the session actually runs on (never the one asked for)."""
        return self.session.get_providers()[0]

    @property
    def expected_shape(self) -> str:
        return "(batch, " + ", ".join(map(str, self.image_shape)) + ")"

    def images(self, files: Sequence[tuple[str, bytes]], max_pixels: int, max_request_pixels: int) -> np.ndarray:
        """Decode uploads (:func:`strata.models.images.decode`, as in training) and apply the input pipeline.

        The headers are read first: a request whose images claim more than ``max_request_pixels`` together
        is refused (413) before any of them is decoded.
        """
        claimed = 0
        for name, data in files:
            try:
                claimed += read_header(data).pixels
            except ImageError as exc:
                raise _refusal(name, exc) from exc
        if claimed > max_request_pixels:
            raise RequestError(
                413,
                f"the {len(files)} images hold {claimed} pixels together; the limit is {max_request_pixels} "
                f"per request: send fewer or smaller images",
            )
        return np.stack([self.transform(decode_image(name, data, max_pixels)) for name, data in files])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (B, classes): softmax of the logits, or the graph's own probabilities."""
        outputs = self.session.run(None, {self.session.get_inputs()[0].name: batch})[0].astype(np.float32)
        if self.outputs_probabilities:
            return outputs
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [
            [{"class": self.labels[i], "probability": float(row[i])} for i in top]
            for row, top in zip(probabilities, order, strict=True)
        ]


def decode_image(name: str, data: bytes, max_pixels: int) -> Image.Image:
    """Bytes → upright RGB image by the one decoder; RequestError 413 over ``max_pixels``, else 415."""
    try:
        return decode(data, max_pixels)
    except ImageError as exc:
        raise _refusal(name, exc) from exc


def _refusal(name: str, exc: ImageError) -> RequestError:
    if isinstance(exc, ImageUnreadableError):
        return RequestError(415, f"{name!r} is not a readable image ({exc.detail})")
    return RequestError(413 if isinstance(exc, ImageTooLargeError) else 415, f"{name!r}: {exc}")


def load_model(ref: ModelRef) -> LoadedModel:
    """Build the session for ``ref`` and prove it runs; raises ModelLoadError otherwise.

    A published export (one with a manifest) must match its manifest file by file: a folder that is still
    being written, or was damaged afterwards, is refused before onnxruntime reads it.
    """
    if (ref.directory / MANIFEST_FILE).is_file() and (problem := manifest_problem(ref.directory, hashes=True)):
        raise ModelLoadError(f"cannot serve {ref.directory} (version {ref.version}): {problem}; export it again")
    try:
        meta = json.loads((ref.directory / META_FILE).read_text())
        names = json.loads((ref.directory / LABELS_FILE).read_text())
        labels = [names[str(i)] for i in range(len(names))]
        session = create_session(ref.directory / MODEL_FILE)
        model = _assemble(ref, session, labels, meta)
        warm = model.predict(np.zeros((1, *model.image_shape), dtype=model.dtype))
    except ModelLoadError:
        raise
    except Exception as exc:  # anything wrong with the files or the graph: the caller keeps its old model
        raise ModelLoadError(f"cannot serve {ref.directory} (version {ref.version}): {exc}") from exc
    if warm.shape != (1, len(labels)):
        raise ModelLoadError(
            f"{ref.directory}: the graph outputs {warm.shape[1:]} scores but labels.json names {len(labels)} classes"
        )
    if model.provider != preferred_providers()[0]:
        logger.warning("asked onnxruntime for %s, but the session runs on %s", preferred_providers()[0], model.provider)
    return model


def _assemble(ref: ModelRef, session: ort.InferenceSession, labels: list[str], meta: dict) -> LoadedModel:
    spec = meta["input"]
    image_shape = tuple(int(d) for d in spec["shape"][1:])
    dtype: np.dtype
    if spec["dtype"] == "uint8":
        height, width, _ = image_shape
        resample = PIL_RESAMPLE[meta.get("transforms", {}).get("interpolation", "bilinear")]

        def transform(image: Image.Image) -> np.ndarray:
            return np.asarray(image.resize((width, height), resample), dtype=np.uint8)

        dtype = np.dtype(np.uint8)
    else:
        if "transforms" not in meta or "image_size" not in meta:
            raise ModelLoadError(f"{ref.directory}/{META_FILE} does not record the test transform; re-export it")
        pipeline = test_transform(TransformConfig(**meta["transforms"]), int(meta["image_size"]))

        def transform(image: Image.Image) -> np.ndarray:
            return pipeline(image).numpy()

        dtype = np.dtype(np.float32)
    kind = meta.get("output", {}).get("kind", "logits")
    return LoadedModel(ref, session, labels, meta, image_shape, dtype, kind == "probabilities", transform)
