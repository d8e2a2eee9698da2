"""LAE's three PET kinds (gqk/LAE ``libml/model/pet``), one instance per adapted ViT block.

Each PET is owned by the method and joins a block only through an :class:`~strata.models.pet.attach.Attachment`
(``pet.attach(attachment, block)``), so the same backbone serves LAE's online and offline experts in turn.
Every PET multiplies its output by a learnable scalar initialised to 1 (the official ``Scaler`` with
``scale: null``); the zero-initialised ones (Adapter, LoRA) leave the ViT unchanged at the start.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from strata.models.pet.attach import Attachment
from strata.models.pet.prefix import attach_prefix

PetKind = Literal["adapter", "lora", "prefix"]


class Scaler(nn.Module):
    """A learnable scalar (init 1.0): part of LAE's speed calibration of every PET's output."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _kaiming(weight: torch.Tensor) -> torch.Tensor:
    """PyTorch's default Linear weight init, which the official PETs use for their down-projections."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class Adapter(nn.Module):
    """Parallel to the whole attention sub-layer: ``x + Attn(LN1 x) + s·Up(GELU(Down(LN1 x)))``.

    ``Attachment.add_output(block.attn, …)`` feeds it the argument of ``block.attn``, which is LN1(x).
    """

    def __init__(self, dim: int, rank: int = 5):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.scaler = Scaler()
        _kaiming(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaler(self.up(F.gelu(self.down(x))))

    def attach(self, attachment: Attachment, block: nn.Module) -> None:
        attachment.add_output(block.attn, self)


class LowRank(nn.Module):
    """``s · x Aᵀ Bᵀ`` with A kaiming-uniform and B zero, so the delta starts at exactly zero."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(_kaiming(torch.empty(rank, dim)))
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.scaler = Scaler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaler(F.linear(F.linear(x, self.down), self.up))


class KVLoRA(nn.Module):
    """Low-rank updates of the K and V rows of the fused ``attn.qkv``; the Q rows get an exact zero."""

    def __init__(self, dim: int, rank: int = 5):
        super().__init__()
        self.key = LowRank(dim, rank)
        self.value = LowRank(dim, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta of the qkv output for input ``x``: ``[0; Δk; Δv]`` along the last axis."""
        key = self.key(x)
        return torch.cat([torch.zeros_like(key), key, self.value(x)], dim=-1)

    def attach(self, attachment: Attachment, block: nn.Module) -> None:
        attachment.add_output(block.attn.qkv, self)


class PrefixTokens(nn.Module):
    """L key and L value tokens in projected K/V space, U(0, 0.01), each set times its own learnable scalar.

    Inserted right after the CLS key/value by the shared :class:`~strata.models.pet.prefix.PrefixAttention`;
    ``compensate`` switches LAE's attention compensation (adaptation-speed calibration), on by default.
    """

    def __init__(self, dim: int, length: int = 10, compensate: bool = True):
        super().__init__()
        self.keys = nn.Parameter(torch.empty(length, dim).uniform_(0, 0.01))
        self.values = nn.Parameter(torch.empty(length, dim).uniform_(0, 0.01))
        self.key_scaler = Scaler()
        self.value_scaler = Scaler()
        self.compensate = compensate

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.key_scaler(self.keys), self.value_scaler(self.values)
        return keys.expand(batch_size, -1, -1), values.expand(batch_size, -1, -1)

    def attach(self, attachment: Attachment, block: nn.Module) -> None:
        attach_prefix(attachment, block, self, "after_cls", self.compensate)


def build_pet(kind: PetKind, dim: int, rank: int = 5, length: int = 10, compensate: bool = True) -> nn.Module:
    """One PET of ``kind`` for a block of width ``dim`` (``rank`` for adapter/lora, ``length`` for prefix)."""
    if kind == "adapter":
        return Adapter(dim, rank)
    if kind == "lora":
        return KVLoRA(dim, rank)
    if kind == "prefix":
        return PrefixTokens(dim, length, compensate)
    raise ValueError(f"unknown LAE PET kind {kind!r}; choose adapter, lora or prefix")
