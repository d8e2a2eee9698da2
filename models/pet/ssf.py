"""SSF: learnable per-channel scale and shift after the ViT's operators (APER's ``SSF`` PET).

``y = γ ⊙ x + β`` with γ ~ N(1, 0.02²), β ~ N(0, 0.02²), applied to the output of the patch embedding,
of each block's LN1, qkv, attention projection, LN2, fc1 and fc2, and of the final LN: 205,824
parameters on ViT-B/16. Each site is a forward hook on the timm submodule, so nothing is copied.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.models.backbones import Backbone
from strata.models.pet.attach import Attachment

BLOCK_SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


class ScaleShift(nn.Module):
    def __init__(self, dim: int, std: float = 0.02):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim).normal_(1.0, std))
        self.shift = nn.Parameter(torch.empty(dim).normal_(0.0, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class SSF(nn.Module):
    """One :class:`ScaleShift` per site, keyed by the site's module path (dots become underscores)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        sites = ssf_sites(backbone)
        self.paths = tuple(sites)
        self.factors = nn.ModuleDict({_key(path): ScaleShift(_width(module)) for path, module in sites.items()})

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        sites = ssf_sites(backbone)
        if tuple(sites) != self.paths:
            raise ValueError("this SSF was built for a backbone with other layers")
        for path, module in sites.items():
            factor = self.factors[_key(path)]
            attachment.forward_hook(module, lambda _m, _args, output, factor=factor: factor(output))


def ssf_sites(backbone: Backbone) -> dict[str, nn.Module]:
    """Module path → module for every place SSF modulates, in forward order."""
    modules = dict(backbone.vit.named_modules())
    paths = ["patch_embed"]
    paths += [f"blocks.{i}.{site}" for i in range(len(backbone.blocks)) for site in BLOCK_SITES]
    paths.append("norm")
    return {path: modules[path] for path in paths}


def _width(module: nn.Module) -> int:
    """Output channels of a site: Linear's out_features, LayerNorm's shape, PatchEmbed's conv channels."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    projection = module.get_submodule("proj")
    if not isinstance(projection, nn.Conv2d):
        raise ValueError(f"SSF cannot tell the output width of {type(module).__name__}: no Linear, LayerNorm or conv")
    return projection.out_channels


def _key(path: str) -> str:
    return path.replace(".", "_")
