"""A JSON tensor from a client → one batch for the graph, or a 4xx saying exactly what is wrong with it.

``np.asarray`` alone would take far too much: numeric strings (``"0.5"``), booleans and, through
``dtype=object``, ``null``; nesting of any depth, checked only after the whole body is converted; and
any value, although the graph was exported for one input range (``[0, 1]`` floats, or ``0..255``
bytes with the preprocessing inside the graph) and answers nonsense outside it. Here the structure
is walked first, level by level down to the input's rank, so a wrong shape or a value that is not a
number is refused before any array is built, and the values are then checked against the range the
export recorded in ``model.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from strata.tasks.serving.loaded_model import RequestError

NUMBER_TYPES = frozenset({int, float})  # bool is a subclass of int: compared by type, never isinstance


@dataclass(frozen=True)
class TensorSpec:
    """What the graph takes for one image, from the export's ``model.json``."""

    shape: tuple[int, ...]  # one image: (3, S, S) float or (H, W, 3) uint8
    dtype: np.dtype
    low: float
    high: float
    layout: str

    @classmethod
    def of(cls, meta: dict, shape: tuple[int, ...], dtype: np.dtype) -> TensorSpec:
        """The recorded input range, or the dtype's own (uint8 0..255) for an export that records none."""
        recorded = meta["input"].get("range")
        if recorded is None:
            recorded = [0, 255] if dtype == np.uint8 else [-np.inf, np.inf]
        low, high = (float(v) for v in recorded)
        return cls(shape, dtype, low, high, meta["input"].get("layout", ""))

    @property
    def expected(self) -> str:
        return f"(batch, {', '.join(map(str, self.shape))}) {self.layout} {self.dtype.name}".rstrip()


def tensor_from_json(body: bytes, spec: TensorSpec) -> np.ndarray:
    """The body ``{"pixels": [...]}`` → a (batch, *shape) array of ``spec.dtype``; RequestError 400/422 otherwise."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from exc
    if not isinstance(payload, dict) or "pixels" not in payload:
        raise RequestError(422, f'expected a JSON object {{"pixels": [...]}} of shape {spec.expected}')
    return checked_tensor(payload["pixels"], spec)


def checked_tensor(pixels: object, spec: TensorSpec) -> np.ndarray:
    """Nested lists of numbers of shape (batch, *spec.shape) inside the recorded range → the batch."""
    level: list[Any] = [pixels]
    for depth, size in enumerate((None, *spec.shape)):
        if not all(type(item) is list for item in level):
            raise _shape_error(spec, f"level {depth} holds something that is not a list")
        if size is None:
            if not pixels:
                raise _shape_error(spec, "the batch is empty")
        elif any(len(item) != size for item in level):
            lengths = sorted({len(item) for item in level})
            raise _shape_error(spec, f"level {depth} has lists of length {lengths}, not {size}")
        level = [value for item in level for value in item]
    if not set(map(type, level)) <= NUMBER_TYPES:
        bad = next(value for value in level if type(value) not in NUMBER_TYPES)
        raise RequestError(422, f"'pixels' must hold numbers only; found {json.dumps(bad)}")
    try:
        values = np.asarray(level, dtype=np.float64)
    except OverflowError as exc:
        raise RequestError(422, f"'pixels' holds a number too large for a float: {exc}") from exc
    if not np.isfinite(values).all():
        raise RequestError(422, "'pixels' must hold finite numbers (no NaN or Infinity)")
    low, high = float(values.min()), float(values.max())
    if low < spec.low or high > spec.high:
        raise RequestError(
            422,
            f"'pixels' values lie in [{low:g}, {high:g}]; this model takes values in [{spec.low:g}, {spec.high:g}] "
            f"(the input range its export recorded)",
        )
    if spec.dtype == np.uint8 and not np.array_equal(values, np.floor(values)):
        raise RequestError(422, "'pixels' must hold whole numbers 0..255 for this uint8 model")
    return values.reshape(-1, *spec.shape).astype(spec.dtype)


def _shape_error(spec: TensorSpec, what: str) -> RequestError:
    return RequestError(422, f"'pixels' must be a rectangular array of numbers of shape {spec.expected}: {what}")
