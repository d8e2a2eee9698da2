"""LAE's three PET kinds (gqk/LAE ``libml/model/pet``), one instance per adapted ViT block.

Each PET knows its block and joins it only through an :class:`~strata.models.pet.attach.Attachment`
(the one ``attach(backbone, attachment)`` of every PET), so the same backbone serves LAE's online and
offline experts in turn. Every PET multiplies its output by a learnable scalar initialised to 1 (the
official ``Scaler`` with ``scale: null``); the zero-initialised ones (Adapter, LoRA) leave the ViT
unchanged at the start. The Adapter is the shared :class:`~strata.models.pet.adapter.BottleneckAdapter`
with LAE's options.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from strata.models.backbones import Backbone
from strata.models.pet.adapter import BottleneckAdapter, Scaler, kaiming_init
from strata.models.pet.attach import Attachment
from strata.models.pet.prefix import attach_prefix

PetKind = Literal["adapter", "lora", "prefix"]


def lae_adapter(dim: int, rank: int = 5, *, block: int) -> BottleneckAdapter:
    """Parallel to the whole attention sub-layer: ``x + Attn(LN1 x) + s·Up(GELU(Down(LN1 x)))``, s learnable."""
    return BottleneckAdapter(dim, rank, block=block, site="attention", activation="gelu", scale=None)


class LowRank(nn.Module):
    """``s · x Aᵀ Bᵀ`` with A kaiming-uniform and B zero, so the delta starts at exactly zero."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(kaiming_init(torch.empty(rank, dim)))
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.scaler = Scaler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaler(F.linear(F.linear(x, self.down), self.up))


class KVLoRA(nn.Module):
    """Low-rank updates of the K and V rows of block ``block``'s fused ``attn.qkv``; the Q rows get an exact zero."""

    def __init__(self, dim: int, rank: int = 5, *, block: int):
        super().__init__()
        self.block = block
        self.key = LowRank(dim, rank)
        self.value = LowRank(dim, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta of the qkv output for input ``x``: ``[0; Δk; Δv]`` along the last axis."""
        key = self.key(x)
        return torch.cat([torch.zeros_like(key), key, self.value(x)], dim=-1)

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        attachment.add_output(backbone.blocks[self.block].get_submodule("attn.qkv"), self)


class PrefixTokens(nn.Module):
    """L key and L value tokens in projected K/V space, U(0, 0.01), each set times its own learnable scalar.

    Inserted right after the CLS key/value of block ``block`` by the shared
    :class:`~strata.models.pet.prefix.PrefixAttention`; ``compensate`` switches LAE's attention compensation
    (adaptation-speed calibration), on by default.
    """

    def __init__(self, dim: int, length: int = 10, compensate: bool = True, *, block: int):
        super().__init__()
        self.block = block
        self.keys = nn.Parameter(torch.empty(length, dim).uniform_(0, 0.01))
        self.values = nn.Parameter(torch.empty(length, dim).uniform_(0, 0.01))
        self.key_scaler = Scaler()
        self.value_scaler = Scaler()
        self.compensate = compensate

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.key_scaler(self.keys), self.value_scaler(self.values)
        return keys.expand(batch_size, -1, -1), values.expand(batch_size, -1, -1)

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        attach_prefix(attachment, backbone.blocks[self.block], self, "after_cls", self.compensate)


def build_pet(
    kind: PetKind, dim: int, *, block: int, rank: int = 5, length: int = 10, compensate: bool = True
) -> nn.Module:
    """One PET of ``kind`` for block ``block`` of width ``dim`` (``rank`` for adapter/lora, ``length`` for prefix)."""
    if kind == "adapter":
        return lae_adapter(dim, rank, block=block)
    if kind == "lora":
        return KVLoRA(dim, rank, block=block)
    if kind == "prefix":
        return PrefixTokens(dim, length, compensate, block=block)
    raise ValueError(f"unknown LAE PET kind {kind!r}; choose adapter, lora or prefix")
