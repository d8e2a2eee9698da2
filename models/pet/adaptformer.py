"""AdaptFormer: a bottleneck MLP parallel to each block's MLP (APER's ``Adapter`` PET), in every block.

In every block ``x_out = x + MLP(LN2(x)) + 0.1 · Up(Dropout_0.1(ReLU(Down(x))))`` where ``x`` is the
residual stream *before* LN2 (the AdaptFormer convention APER uses; reading LN2's output instead is a
common, silent mistake). Each block's branch is a :class:`~strata.models.pet.adapter.BottleneckAdapter`
with the ``mlp`` site.
"""

from __future__ import annotations

from torch import nn

from strata.models.backbones import Backbone
from strata.models.pet.adapter import BottleneckAdapter
from strata.models.pet.attach import Attachment, PETList


class AdaptFormer(nn.Module):
    """One ReLU bottleneck adapter (fixed scale, dropout) per block of ``backbone``, under ``adapters.<block>``."""

    def __init__(self, backbone: Backbone, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.adapters = PETList(
            BottleneckAdapter(
                backbone.embed_dim, bottleneck, block=i, site="mlp", activation="relu", scale=scale, dropout=dropout
            )
            for i in range(len(backbone.blocks))
        )

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        if len(backbone.blocks) != len(self.adapters):
            raise ValueError(f"this AdaptFormer has {len(self.adapters)} adapters for {len(backbone.blocks)} blocks")
        self.adapters.attach(backbone, attachment)
