"""Pure modules for export: the optional in-graph preprocessing in front of a method's inference module.

With preprocessing inside the graph, clients send raw uint8 HWC images of one fixed size and the
graph does what the method's test transform does: scale to [0, 1], resize the short side to
``size·test_resize_ratio`` and centre-crop ``size`` (or resize straight to ``size`` when the ratio is
1). Tensor resizing (antialiased) is close to, not bit-identical with, PIL's; the parity gate compares
the graph with this same module in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.models.transforms import TransformConfig


class PreprocessedModel(nn.Module):
    """uint8 (B, H, W, 3) → the method's test transform → inference module → logits."""

    def __init__(self, model: nn.Module, transforms: TransformConfig, size: int, input_hw: tuple[int, int]):
        super().__init__()
        self.model = model
        self.mode = transforms.interpolation
        self.size = size
        height, width = input_hw
        if transforms.test_resize_ratio == 1.0:
            self.resized = (size, size)
        else:
            short = int(size * transforms.test_resize_ratio)
            scale = short / min(height, width)
            self.resized = (short, int(width * scale)) if height <= width else (int(height * scale), short)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).float() / 255.0
        pixels = F.interpolate(pixels, size=self.resized, mode=self.mode, align_corners=False, antialias=True)
        top = (self.resized[0] - self.size) // 2
        left = (self.resized[1] - self.size) // 2
        pixels = pixels[:, :, top : top + self.size, left : left + self.size].clamp(0.0, 1.0)
        return self.model(pixels)
