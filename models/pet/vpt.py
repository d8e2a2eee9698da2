"""Visual prompt tuning (VPT) as APER uses it: zero-initialised tokens appended at the END of the sequence.

* shallow: one set of ``num_tokens`` prompts is appended once, after the position embedding (on the
  output of ``norm_pre``), carried through all blocks and removed before the final norm;
* deep: each block gets its own fresh set, appended before the block and dropped after it (the
  per-layer replacement of VPT-deep).

Zero prompts still take part in attention, so VPT is not an identity at initialisation. The CLS
feature is unaffected by removing the prompts before the final LayerNorm, which acts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.models.backbones import Backbone
from strata.models.pet.attach import Attachment


class VisualPrompts(nn.Module):
    """Prompt tokens of shape ``(sets, num_tokens, D)``: one set (shallow) or one per block (deep)."""

    def __init__(self, backbone: Backbone, num_tokens: int = 5, deep: bool = False):
        super().__init__()
        self.deep = deep
        sets = len(backbone.blocks) if deep else 1
        self.prompts = nn.Parameter(torch.zeros(sets, num_tokens, backbone.embed_dim))

    @property
    def num_tokens(self) -> int:
        return self.prompts.shape[1]

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        if self.deep:
            for block, prompts in zip(backbone.blocks, self.prompts, strict=True):
                self._wrap(block, block, prompts, attachment)
        else:
            self._wrap(backbone.vit.norm_pre, backbone.vit.norm, self.prompts[0], attachment, append_after=True)

    def _wrap(
        self,
        start: nn.Module,
        end: nn.Module,
        prompts: torch.Tensor,
        attachment: Attachment,
        append_after: bool = False,
    ) -> None:
        """Append ``prompts`` at ``start`` (its input, or its output if ``append_after``) and drop them at ``end``."""
        n = self.num_tokens
        if append_after:
            attachment.forward_hook(start, lambda _m, _args, tokens: _append(tokens, prompts))
            attachment.forward_pre_hook(end, lambda _m, args: (args[0][:, :-n], *args[1:]))
        else:
            attachment.forward_pre_hook(start, lambda _m, args: (_append(args[0], prompts), *args[1:]))
            attachment.forward_hook(end, lambda _m, _args, tokens: tokens[:, :-n])


def _append(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    return torch.cat([tokens, prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)], dim=1)
