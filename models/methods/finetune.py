"""Sequential finetuning: the forgetting lower bound every method should beat.

Each task trains a growing linear head (and, in ``full`` mode, the whole backbone) with
cross-entropy over all seen classes on the new task's data only, so old classes are overwritten.
Defaults follow APER's finetune recipe (SGD momentum 0.9, lr 0.01, wd 5e-4, cosine), run on
every task instead of only the first.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from strata.models.engine import OptimizerConfig, TrainConfig
from strata.models.heads import GrowingLinear
from strata.models.methods.base import Method, MethodConfig
from strata.models.methods.registry import register_method


class FinetuneConfig(MethodConfig):
    mode: Literal["full", "head"] = "full"
    train: TrainConfig = TrainConfig(
        epochs=5,
        batch_size=48,
        optimizer=OptimizerConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    )


class Finetune(Method[FinetuneConfig]):
    config_class = FinetuneConfig

    def __init__(self, name: str, config: FinetuneConfig, backbone):
        super().__init__(name, config, backbone)
        self.head = GrowingLinear(backbone.embed_dim)
        if config.mode == "full":
            self.backbone.requires_grad_(True)

    @property
    def trains_backbone(self) -> bool:
        return self.config.mode == "full"

    def prepare_task(self, index: int, num_new: int) -> None:
        self.head.grow(num_new)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def training_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(inputs), labels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixels))


register_method(
    "finetune",
    Finetune,
    FinetuneConfig,
    "sequential finetuning with CE over all seen classes (full or head-only): the lower bound",
)
register_method(
    "finetune_head",
    Finetune,
    lambda: FinetuneConfig(mode="head"),
    "sequential head-only finetuning on the frozen backbone",
)
