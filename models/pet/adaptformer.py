"""AdaptFormer: a bottleneck MLP parallel to each block's MLP (APER's ``Adapter`` PET).

In every block ``x_out = x + MLP(LN2(x)) + s · Up(Dropout(ReLU(Down(x))))`` where ``x`` is the residual
stream *before* LN2 (the AdaptFormer convention APER uses; reading LN2's output instead is a common,
silent mistake). The timm block is not copied: a pre-hook on ``norm2`` records its input and a hook on
``mlp`` adds the adapter branch to the MLP's output. timm's ``ls2``/``drop_path2`` follow the MLP and
are identities for the checkpoints APER uses (no layer scale, no drop path), so the sum is the same.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from strata.models.backbones import Backbone
from strata.models.pet.attach import Attachment


class BottleneckAdapter(nn.Module):
    """``scale · Up(Dropout(ReLU(Down(x))))`` with a zero up-projection, so it starts as a no-op."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(torch.relu(self.down(x))))


class AdaptFormer(nn.Module):
    """One :class:`BottleneckAdapter` per block of ``backbone`` (all blocks)."""

    def __init__(self, backbone: Backbone, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.adapters = nn.ModuleList(
            BottleneckAdapter(backbone.embed_dim, bottleneck, scale, dropout) for _ in backbone.blocks
        )

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        for block, adapter in zip(backbone.blocks, self.adapters, strict=True):
            _attach_parallel_to_mlp(block, adapter, attachment)


def _attach_parallel_to_mlp(block: nn.Module, adapter: nn.Module, attachment: Attachment) -> None:
    """Feed ``adapter`` the pre-LN2 stream and add its output to the block's MLP output."""
    residual: list[torch.Tensor] = []
    attachment.forward_pre_hook(block.norm2, lambda _m, args: residual.append(args[0]))
    attachment.forward_hook(block.mlp, lambda _m, _args, output: output + adapter(residual.pop()))
