"""OVOR's OnePrompt: one set of prefix prompts shared by every task, with no pool and no query pass.

Each prompted layer owns L tokens (U(0, 1) init, as CODA-P's ``tensor_prompt``); the first L/2 are
prepended to the projected keys and the last L/2 to the projected values, in front of the CLS token
and without attention compensation. The attention itself is the shared
:class:`~strata.models.pet.prefix.PrefixAttention`; this module holds the tokens and, while attached,
swaps it in at the prompted layers.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.models.backbones import Backbone
from strata.models.pet.attach import Attachment, adapted_blocks
from strata.models.pet.prefix import attach_prefix

# Official ``prompt_param [10, 40, 10]``: length 10 ("g" prompts) at layers 0-1, 40 ("e") at 2-4.
DEFAULT_LENGTHS: dict[int, int] = {0: 10, 1: 10, 2: 40, 3: 40, 4: 40}


class LayerPrompt(nn.Module):
    """The L prompt tokens of one layer: first half keys, second half values."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        if length % 2:
            raise ValueError(f"prompt length {length} must be even (half keys, half values)")
        self.tokens = nn.Parameter(torch.empty(length, dim).uniform_(0.0, 1.0))

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.tokens.expand(batch_size, -1, -1).chunk(2, dim=1)
        return keys, values


class OnePrompt(nn.Module):
    """Prompts for the layers of ``lengths`` that exist in the backbone, under ``layers.<block>``.

    Building it leaves the backbone untouched: the prompts join it through ``attach`` like every PET.
    """

    def __init__(self, backbone: Backbone, lengths: dict[int, int] = DEFAULT_LENGTHS):
        super().__init__()
        layers = adapted_blocks(len(backbone.blocks), sorted(lengths))
        self.layers = nn.ModuleDict({str(i): LayerPrompt(lengths[i], backbone.embed_dim) for i in layers})

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        for index, prompt in self.layers.items():
            attach_prefix(attachment, backbone.blocks[int(index)], prompt, position="front", compensate=False)
