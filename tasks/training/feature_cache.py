"""The on-disk frozen-feature cache: one safetensors file per content key under ``.strata/cache/features``.

The engine (``strata.models.engine.Engine.extract``) computes the keys from content only (data md5, class ids,
backbone name + weights fingerprint, learned feature tensors such as APER's PET, transform, device,
batch size, and for random transforms the RNG state); this module only stores and reads tensors.
Writes are atomic (temporary file + ``os.replace``), so a crash never leaves a half-written entry under a
key; an entry that cannot be read is logged, removed and recomputed. No pickle anywhere.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from strata.tasks.workspace.settings import StrataSettings

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^[0-9a-f]{16,128}$")
SUFFIX = ".safetensors"


def features_folder(settings: StrataSettings) -> Path:
    """Where a workspace keeps its feature cache (one folder for the flow and its training processes)."""
    return settings.state_dir / "cache" / "features"


class DiskFeatureCache:
    """A :class:`~strata.models.features.FeatureCache` in ``folder`` (created on first write)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"feature-cache keys are lowercase hex digests, got {key!r}")
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception as exc:  # truncated, corrupt or foreign file: recompute rather than fail
            logger.warning(
                "ignoring unreadable cached features %s (%s: %s); recomputing", path, type(exc).__name__, exc
            )
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key[:12]}-", suffix=".tmp")
        os.close(handle)
        try:
            save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        return len(list(self.folder.glob(f"*{SUFFIX}"))) if self.folder.is_dir() else 0
