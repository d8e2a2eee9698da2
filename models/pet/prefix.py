"""Prefix attention: key/value tokens in projected K/V space — ONE implementation for LAE's Prefix
(inserted after the CLS key, with attention compensation) and OVOR's OnePrompt (prepended, none).

Compensation (LAE ``Prefix.compensate``): after the softmax over the N+L keys, the prefix weights are
divided by their total mass λ (per query and head) and the others are left as they are, so the
output is (1−λ)·Attn(q, K, V) + Attn(q, K_prefix, V_prefix): prefix tuning then adapts as fast as a
parallel adapter instead of being down-weighted by the small λ.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from strata.models.pet.attach import Attachment

PrefixPosition = Literal["front", "after_cls"]


class PrefixAttention(nn.Module):
    """Drop-in for a timm ``Attention`` whose keys and values get prefix tokens.

    ``prefix(batch_size)`` returns ``(keys, values)``, each ``(B, L, attn_dim)`` in projected space
    (they are concatenated after ``qkv``, never passed through W_k/W_v). The prefix module belongs to
    the method; it is held here without being registered, so the backbone's state is unchanged.
    The timm submodules are the same objects under the same names as in the wrapped attention.
    """

    def __init__(
        self, attn: Attention, prefix: nn.Module, position: PrefixPosition = "front", compensate: bool = False
    ):
        super().__init__()
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        if getattr(attn, "gate", None) is not None:
            raise ValueError("prefix attention does not support gated timm attention")
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.scale = attn.scale
        self.position = position
        self.compensate = compensate
        self._prefix = (prefix,)  # a tuple keeps nn.Module from registering it

    @property
    def prefix(self) -> nn.Module:
        return self._prefix[0]

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        B, L, _ = tokens.shape
        return tokens.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("prefix attention is for ViT self-attention without masks")
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        prefix_k, prefix_v = (self._heads(t) for t in self.prefix(B))
        start = 0 if self.position == "front" else 1
        length = prefix_k.shape[2]
        k = torch.cat([k[:, :, :start], prefix_k, k[:, :, start:]], dim=2)
        v = torch.cat([v[:, :, :start], prefix_v, v[:, :, start:]], dim=2)
        if self.compensate:
            attn = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)
            mass = attn[..., start : start + length].sum(dim=-1, keepdim=True).clamp_min(1e-12)
            attn = torch.cat(
                [attn[..., :start], attn[..., start : start + length] / mass, attn[..., start + length :]], dim=-1
            )
            out = self.attn_drop(attn) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(out))


def attach_prefix(
    attachment: Attachment, block: nn.Module, prefix: nn.Module, position: PrefixPosition, compensate: bool
) -> None:
    """Swap ``block.attn`` for a :class:`PrefixAttention` recorded in ``attachment``.

    The block's attention is read as a timm ``Attention``: PrefixAttention takes its submodules and sizes by
    those names (a block of another attention class fails there, on the first name it lacks)."""
    attn = cast(Attention, block.get_submodule("attn"))
    attachment.swap(block, "attn", PrefixAttention(attn, prefix, position, compensate))
