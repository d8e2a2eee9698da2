"""Hook for timing the official code on the same machine: ``STRATA_OFFICIAL_<METHOD>=/path/to/checkout``.

The official code is never part of this repository; the benchmark imports it from the path given, with
``.cuda()`` patched to a no-op when no GPU is visible (all three hard-code it). A method whose path is
not given is skipped with a message saying which variable to set. Their pinned dependencies (timm 0.5.4
with Lightning Fabric for LAE, timm 0.6.12 for RevisitingCIL, timm 0.4.12 for OVOR) are reported when
the import fails in this environment instead of being worked around.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager

import torch

# method prefix → (environment variable, repository, entry module imported from the checkout)
OFFICIAL = {
    "lae": ("STRATA_OFFICIAL_LAE", "gqk/LAE", "main"),
    "aper": ("STRATA_OFFICIAL_APER", "zhoudw-zdw/RevisitingCIL", "trainer"),
    "simplecil": ("STRATA_OFFICIAL_APER", "zhoudw-zdw/RevisitingCIL", "trainer"),
    "ovor": ("STRATA_OFFICIAL_OVOR", "jpmorganchase/ovor", "trainer"),
}


@contextmanager
def cuda_on_cpu():
    """``Tensor.cuda()`` and ``Module.cuda()`` return their receiver unchanged while no GPU is visible."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def load(path: str, module: str):
    """Import ``module`` from the checkout at ``path`` (prepended to ``sys.path`` for the import)."""
    sys.path.insert(0, path)
    try:
        with cuda_on_cpu():
            return importlib.import_module(module)
    finally:
        sys.path.remove(path)


def status(prefix: str) -> dict:
    variable, repository, module = OFFICIAL[prefix]
    path = os.environ.get(variable)
    if not path:
        return {"status": "skipped", "reason": f"set {variable}=/path/to/a/{repository} checkout to compare"}
    try:
        load(path, module)
    except Exception as exc:  # their pinned dependencies are not ours: report, do not work around
        return {"status": "import_failed", "path": path, "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "imported", "path": path,
            "reason": "driving the official training step is not implemented; no Strata/official ratio"}


def compare(methods: list[str]) -> dict:
    """One status per official code base that the measured methods belong to."""
    prefixes = sorted({prefix for name in methods for prefix in OFFICIAL if name.startswith(prefix)})
    return {prefix: status(prefix) for prefix in prefixes}
