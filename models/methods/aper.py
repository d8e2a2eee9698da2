"""APER (a.k.a. ADAM): adapt the pretrained ViT once, merge it with the frozen one, classify by prototypes.

RevisitingCIL ``models/aper_*.py``: in task 0 only, a PET (AdaptFormer, SSF, VPT shallow/deep) or a
full copy of the ViT (finetune) is trained with cross-entropy on a cosine head with learnable σ;
that head is then discarded. From then on the model is frozen: the feature is
``[f_PTM(x) ‖ f_adapted(x)]`` (PTM first, no per-branch normalisation), and every task, including
task 0, only writes the class means of the raw merged features of its training images (test
transform) into a cosine classifier. The five variants are one class with five configs.

The PTM and the adapted branch share one :class:`~strata.models.backbones.Backbone`: the PET is attached by
hooks for the adapted forward and detached again, so the frozen weights exist once.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from strata.models.backbones import Backbone, BackboneError, weights_fingerprint
from strata.models.engine import Engine, OptimizerConfig, TrainConfig
from strata.models.heads import CosineClassifier
from strata.models.methods.base import Method, MethodConfig
from strata.models.methods.registry import register_method
from strata.models.methods.simplecil import add_prototypes
from strata.models.pet.adaptformer import AdaptFormer
from strata.models.pet.attach import Attachment, attached
from strata.models.pet.ssf import SSF
from strata.models.pet.vpt import VisualPrompts
from strata.models.streams import Task

logger = logging.getLogger(__name__)

PetKind = Literal["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"]


def sgd_recipe(lr: float, batch_size: int, epochs: int, weight_decay: float = 5e-4) -> TrainConfig:
    """The official task-0 recipe: SGD momentum 0.9, cosine annealing to 0 stepped per epoch."""
    return TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        optimizer=OptimizerConfig(
            name="sgd", lr=lr, momentum=0.9, weight_decay=weight_decay, schedule="cosine", min_lr=0.0
        ),
    )


class AperConfig(MethodConfig):
    pet: PetKind = "adapter"
    bottleneck: int = 64  # AdaptFormer's ffn_num
    prompt_tokens: int = 5  # VPT's prompt_token_num
    # Expected backbone width; set by the profiles so that a mismatched --backbone fails at build time.
    embed_dim: int | None = None
    train: TrainConfig = sgd_recipe(lr=0.01, batch_size=48, epochs=20)
    eval_batch_size: int = 128


class TunedCopy(nn.Module):
    """APER-finetune's "PET": a trainable copy of the whole ViT that stands in for the frozen one."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.vit = copy.deepcopy(backbone.vit).requires_grad_(True)

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        attachment.swap(backbone, "vit", self.vit)


def build_pet(config: AperConfig, backbone: Backbone) -> AdaptFormer | SSF | TunedCopy | VisualPrompts:
    """The variant's PET for ``backbone`` (a :class:`~strata.models.pet.attach.PET`, like every PET)."""
    if config.pet == "adapter":
        return AdaptFormer(backbone, bottleneck=config.bottleneck)
    if config.pet == "ssf":
        return SSF(backbone)
    if config.pet == "finetune":
        return TunedCopy(backbone)
    return VisualPrompts(backbone, num_tokens=config.prompt_tokens, deep=config.pet == "vpt_deep")


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters of a PET (the "Trainable params" figure of the official logs)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Aper(Method[AperConfig]):
    config_class = AperConfig

    def __init__(self, name: str, config: AperConfig, backbone: Backbone):
        super().__init__(name, config, backbone)
        if config.embed_dim is not None and config.embed_dim != backbone.embed_dim:
            raise BackboneError(
                f"{name} is configured for a {config.embed_dim}-wide backbone, but "
                f"{backbone.info.label} is {backbone.embed_dim} wide; pick a matching --backbone"
            )
        self.pet = build_pet(config, backbone)
        self.head = CosineClassifier(2 * backbone.embed_dim)
        self.train_head: CosineClassifier | None = None  # task 0's CE head; discarded after adaptation

    @property
    def pet_parameters(self) -> int:
        return parameter_count(self.pet)

    def prepare_task(self, index: int, num_new: int) -> None:
        self.head.grow(num_new)

    def fit_task(self, task: Task, engine: Engine) -> list[float]:
        losses = self._adapt(task, engine) if task.index == 0 else []
        self.eval()
        add_prototypes(self, self.features, self.head, task, engine)
        return losses

    def feature_identity(self) -> str:
        """The PTM and the PET state: task 0's adaptation changes the adapted branch, hence the key."""
        return f"{super().feature_identity()}:pet={self.config.pet}:{weights_fingerprint(self.pet)}"

    def _adapt(self, task: Task, engine: Engine) -> list[float]:
        """Train the PET with CE on a fresh cosine head over task 0's classes, then drop the head."""
        logger.info(
            "%s: training %s PET parameters (%s) in task 0", self.name, f"{self.pet_parameters:,}", self.config.pet
        )
        self.train_head = CosineClassifier(self.backbone.embed_dim, task.num_new).to(self.device)
        try:
            return super().fit_task(task, engine)
        finally:
            self.train_head = None

    def adaptation_head(self) -> CosineClassifier:
        """Task 0's CE head, which exists only while ``_adapt`` trains the PET."""
        if self.train_head is None:
            raise RuntimeError(f"{self.name} trains only while adapting its PET in task 0")
        return self.train_head

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.pet.parameters(), *self.adaptation_head().parameters()]

    def training_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.adaptation_head()(self.adapted_features(inputs)), labels)

    def adapted_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with attached(self.backbone, self.pet):
            return self.backbone(pixels)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The merged feature ``[f_PTM ‖ f_adapted]``, raw (prototypes average exactly this)."""
        return torch.cat([self.backbone(pixels), self.adapted_features(pixels)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "pet_parameters": self.pet_parameters}


_VARIANTS: dict[PetKind, tuple[TrainConfig, str]] = {
    "adapter": (sgd_recipe(0.01, 48, 20), "AdaptFormer (r=64, all blocks)"),
    "ssf": (sgd_recipe(0.01, 48, 20), "SSF scale/shift"),
    "vpt_shallow": (sgd_recipe(0.01, 48, 20), "VPT-shallow (5 end tokens)"),
    "vpt_deep": (sgd_recipe(0.05, 16, 5), "VPT-deep (5 end tokens per block)"),
    "finetune": (sgd_recipe(0.01, 128, 5), "full finetuning of a copy"),
}

for _pet, (_train, _what) in _VARIANTS.items():
    register_method(
        f"aper_{_pet}",
        Aper,
        partial(AperConfig, pet=_pet, train=_train),
        f"APER/ADAM with {_what} adapted in task 0, merged with the frozen PTM; prototype cosine",
        aliases=(f"adam_{_pet}",),
    )
