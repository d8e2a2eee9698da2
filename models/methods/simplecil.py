"""SimpleCIL: a training-free prototype classifier on the frozen pretrained backbone.

For each task, the frozen ViT embeds the task's *training* images under the *test* transform;
each class's prototype is the mean of its raw CLS features, and inference is σ·cos(f(x), prototype)
over all seen classes (RevisitingCIL ``models/simplecil.py``). Nothing is trained.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from strata.models.engine import Engine, TrainConfig
from strata.models.heads import CosineClassifier, class_means
from strata.models.methods.base import Method, MethodConfig
from strata.models.methods.registry import register_method
from strata.models.streams import Task


class SimpleCILConfig(MethodConfig):
    train: TrainConfig = TrainConfig(epochs=0)  # training-free; the official JSON's epochs are unused
    eval_batch_size: int = 128  # the official loaders' hard-coded batch


class SimpleCIL(Method[SimpleCILConfig]):
    config_class = SimpleCILConfig

    def __init__(self, name: str, config: SimpleCILConfig, backbone):
        super().__init__(name, config, backbone)
        self.head = CosineClassifier(backbone.embed_dim)

    def prepare_task(self, index: int, num_new: int) -> None:
        self.head.grow(num_new)

    def fit_task(self, task: Task, engine: Engine) -> list[float]:
        add_prototypes(self, self.features, self.head, task, engine)
        return []

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


def add_prototypes(
    method: Method, features: Callable[[torch.Tensor], torch.Tensor], head: CosineClassifier, task: Task, engine: Engine
) -> None:
    """Embed the task's training images once through ``features`` (the method's test transform, inference mode)
    and write their class means into ``head``; the engine may serve the embeddings from its feature cache."""
    transform = method.test_transform()
    cache_key = method.feature_cache_key(task, transform, "train")
    embedded, labels = engine.extract(
        features, task.train.with_transform(transform), method.config.eval_batch_size, cache_key
    )
    head.set_prototypes(torch.tensor(task.class_ids), class_means(embedded, labels, task.class_ids))


register_method(
    "simplecil", SimpleCIL, SimpleCILConfig, "prototype cosine classifier on the frozen backbone (training-free)"
)
