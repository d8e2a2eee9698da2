"""Classifier heads that grow with the classes of each task.

Growing keeps old rows bit-identical, so old-class logits do not change when a task is added.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """σ · cos(x, w_c) over the seen classes (``CosineLinear`` of APER/SimpleCIL).

    Rows start uniform(−1/√D, 1/√D) when the head is trained (APER's task-0 head) or are written as
    class prototypes (SimpleCIL, APER after the merge). σ is learnable, initialised to 1.
    """

    def __init__(self, in_features: int, num_classes: int = 0):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.sigma = nn.Parameter(torch.ones(1))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_new: int) -> None:
        """Append ``num_new`` zero rows (to be filled with prototypes), keeping old rows and σ."""
        extra = self.weight.new_zeros(num_new, self.in_features)
        self.weight = nn.Parameter(torch.cat([self.weight.data, extra]), self.weight.requires_grad)

    @torch.no_grad()
    def set_prototypes(self, class_ids: torch.Tensor, prototypes: torch.Tensor) -> None:
        self.weight[class_ids] = prototypes.to(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class GrowingLinear(nn.Module):
    """One linear layer over all seen classes; new rows get PyTorch's default Linear init."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_new: int) -> None:
        fresh = nn.Linear(self.in_features, num_new).to(self.weight.device, self.weight.dtype)
        self.weight = nn.Parameter(torch.cat([self.weight.data, fresh.weight.data]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, fresh.bias.data]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def class_means(features: torch.Tensor, labels: torch.Tensor, class_ids: tuple[int, ...]) -> torch.Tensor:
    """Mean of the raw (un-normalised) features of each class, in ``class_ids`` order."""
    means = []
    for class_id in class_ids:
        members = features[labels == class_id]
        if len(members) == 0:
            raise ValueError(f"class {class_id} has no training samples to build a prototype from")
        means.append(members.mean(dim=0))
    return torch.stack(means)
