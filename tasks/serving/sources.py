"""Where the served model comes from: a tiny protocol the server polls for hot reload.

A source answers one question, ``current()``: which version should be served now, and in which
directory its export lies (``model.onnx`` + ``labels.json`` + ``model.json`` as written by
:func:`strata.tasks.export.onnx_graph.export_method`). The server reloads when the version string or the
directory's content (``content_stamp``) changes, and tries a content that failed to load only once. ``current()`` is
called every few seconds from a worker thread: keep it cheap, and raise (the server logs it and keeps
serving) when the answer is unknown. Other sources — e.g. an MLflow alias such as ``champion`` resolved
to an exported directory — implement the same one method.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

from strata.models.errors import UserError
from strata.tasks.export.layout import LABELS_FILE, META_FILE, MODEL_FILE

VERSION_CHARS = 12


class ModelSourceError(UserError, RuntimeError):
    """The source cannot say which model to serve (missing or unreadable export)."""


@dataclass(frozen=True)
class ModelRef:
    """One servable model: a version label and the export directory that holds it."""

    version: str
    directory: Path


def content_stamp(directory: Path) -> str:
    """What the directory holds now, as 12 hex digits of sha256 over its files' names, sizes and mtimes.

    Any write, fix or re-publication (a new folder renamed into place) changes it, so the server can tell
    "this exact content failed to load" from "this directory was fixed" without reading a large graph.
    """
    try:
        entries = sorted((p.name, s.st_size, s.st_mtime_ns) for p in directory.iterdir() for s in [p.stat()])
    except OSError as exc:
        raise ModelSourceError(f"cannot read {directory}: {exc}") from exc
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:VERSION_CHARS]


class ModelSource(Protocol):
    def current(self) -> ModelRef:
        """The model that should be served now; raises ModelSourceError when it cannot tell."""
        ...


class ExportDirSource:
    """An export directory on disk, or a symlink to one.

    Swapping a symlink (``os.replace``) to a complete new export is the atomic way to publish; writing
    a new export in place also works, since a half-written one fails to load and the old model stays.
    The version is ``model.json``'s ``version`` field when present, else the first 12 hex digits of
    sha256(model.json + model.onnx); the hash is recomputed only when a file's size or mtime changes,
    so polling a large model costs two ``stat`` calls.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._cache: tuple[tuple, str] | None = None

    def current(self) -> ModelRef:
        directory = self.path.resolve()
        files = [directory / name for name in (META_FILE, MODEL_FILE, LABELS_FILE)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelSourceError(f"{directory} is not a Strata ONNX export: missing {', '.join(missing)}")
        meta_path, model_path = files[0], files[1]
        try:
            declared = json.loads(meta_path.read_text()).get("version")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelSourceError(f"cannot read {meta_path}: {exc}") from exc
        if declared:
            return ModelRef(str(declared), directory)
        return ModelRef(self._content_hash(meta_path, model_path), directory)

    def _content_hash(self, *paths: Path) -> str:
        stamp = tuple((str(p), s.st_size, s.st_mtime_ns) for p in paths for s in [os.stat(p)])
        if self._cache is None or self._cache[0] != stamp:
            digest = hashlib.sha256()
            for path in paths:
                with path.open("rb") as handle:
                    for chunk in iter(partial(handle.read, 1 << 20), b""):
                        digest.update(chunk)
            self._cache = (stamp, digest.hexdigest()[:VERSION_CHARS])
        return self._cache[1]
