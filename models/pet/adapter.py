"""The bottleneck adapter: ONE class for LAE's Adapter and APER's AdaptFormer, which differ only in options.

``y = s · Up(Dropout(act(Down(x))))``, added to the output of one sub-layer of one ViT block:

* ``site``: ``"attention"`` (LAE) is parallel to the whole MHSA sub-layer and reads its input LN1(x);
  ``"mlp"`` (AdaptFormer) is parallel to the MLP and reads the residual stream x *before* LN2, not LN2(x);
* ``activation``: GELU (LAE) or ReLU (AdaptFormer);
* ``scale``: None (LAE) is a learnable scalar initialised to 1; a float (AdaptFormer: 0.1) is fixed;
* ``dropout`` on the bottleneck activations: 0 (LAE) or 0.1 (AdaptFormer);
* bottleneck width: 5 (LAE ``down_sample: 5``) or 64 (AdaptFormer ``ffn_num``).

Both initialise Down with kaiming_uniform(a=√5) and zero biases, and Up with zeros, so the adapter is an
exact no-op at the start (dropout included). State keys: ``down.*``, ``up.*`` and, for a learnable scale,
``scaler.scale`` — the keys both former classes saved, so stored states load unchanged. The timm block is
never copied: hooks add the branch (timm's ``ls``/``drop_path`` after the sub-layers are identities for
these checkpoints, so the sums are the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from strata.models.backbones import Backbone
from strata.models.pet.attach import Attachment

AdapterSite = Literal["attention", "mlp"]
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu}


class Scaler(nn.Module):
    """LAE's ``Scaler``: ``scale=None`` is a learnable scalar initialised to 1 (part of LAE's speed calibration
    of every PET's output); a float is a fixed factor that adds nothing to the state."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0)) if scale is None else scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def kaiming_init(weight: torch.Tensor) -> torch.Tensor:
    """PyTorch's default Linear weight init, which the official PETs use for their down-projections."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class BottleneckAdapter(nn.Module):
    """A bottleneck MLP parallel to the ``site`` sub-layer of block ``block`` (options in the module docstring)."""

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        *,
        block: int,
        site: AdapterSite,
        activation: Literal["gelu", "relu"],
        scale: float | None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if site not in ("attention", "mlp"):
            raise ValueError(f"adapter site {site!r} is neither 'attention' nor 'mlp'")
        self.block, self.site, self.activation = block, site, activation
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)  # p=0 returns its input untouched and draws no random numbers
        self.scaler = Scaler(scale)
        kaiming_init(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaler(self.up(self.dropout(ACTIVATIONS[self.activation](self.down(x)))))

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        block = backbone.blocks[self.block]
        if self.site == "attention":  # the hook's argument is the attention's input, LN1(x)
            attachment.add_output(block.get_submodule("attn"), self)
            return
        residual: list[torch.Tensor] = []  # the pre-LN2 stream, recorded on its way into norm2
        attachment.forward_pre_hook(block.get_submodule("norm2"), lambda _m, args: residual.append(args[0]))
        attachment.forward_hook(block.get_submodule("mlp"), lambda _m, _args, output: output + self(residual.pop()))
