"""Rebuild a learned method from its saved state (safetensors + JSON), as every consumer must.

Used by the MLflow pyfunc, by export and by anything else that turns a registered version back into
a model: the state names its method, config and backbone; the backbone's weights come from timm's
pretrained loading or the given file, and the state refuses weights other than its own.
"""

from __future__ import annotations

from pathlib import Path

from strata.models.backbones import build_backbone
from strata.models.methods import Method, create_method, read_state_meta


def restore_method(state_dir: str | Path, weights: str | None = None) -> Method:
    meta = read_state_meta(state_dir)
    backbone = build_backbone(meta["backbone"]["name"], weights)
    method = create_method(meta["method"], backbone, overrides=meta["config"])
    method.load_state(state_dir)
    return method.eval()
