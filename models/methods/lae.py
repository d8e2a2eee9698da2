"""LAE — Learning, Accumulation, Ensemble (ICCV 2023, gqk/LAE ``main.py``), with Adapter, KV-LoRA or Prefix.

* Learning: an online PET set (blocks 0-4) and one linear head per task, trained with Adam at a constant
  lr on the new-class logits only, so old heads get zero gradients and never change. From task 1 on the
  PETs are frozen for the first ``freeze_epochs`` epochs while the fresh head warms up.
* Accumulation: at the start of task 1 the offline PET set becomes a copy of the online one; after
  every optimizer step (frozen epochs included) it moves by EMA (decay 0.9999) over its whole state.
* Ensemble: both experts share the backbone and the heads; the prediction is the argmax of the
  element-wise max of their softmaxes (online only in task 0).

``forward`` therefore returns *probabilities*, not logits: their argmax is the method's prediction,
and that maximum of two softmaxes is what the exported ONNX graph computes too. The blocks before the
first adapted one are identical for both experts, so they run once per image.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from strata.models.engine import OptimizerConfig, TrainConfig
from strata.models.methods.base import Method, MethodConfig
from strata.models.methods.registry import register_method
from strata.models.pet.attach import PETList, adapted_blocks, attached
from strata.models.pet.lae_pets import PetKind, build_pet
from strata.models.transforms import TransformConfig


class LAEConfig(MethodConfig):
    """Defaults of the official CIFAR-100 runs (``config/base/cifar100_order1.yaml`` + ``vit_*.yaml``)."""

    pet: PetKind = "adapter"
    adapt_blocks: list[int] = [0, 1, 2, 3, 4]
    rank: int = Field(5, gt=0, description="adapter bottleneck / LoRA rank")
    prefix_length: int = Field(10, gt=0)
    compensate: bool = True  # prefix attention compensation (adaptation-speed calibration)
    freeze_epochs: int = Field(3, ge=0, description="epochs of frozen PETs at the start of tasks >= 1")
    ema_decay: float = Field(0.9999, ge=0, le=1)
    head_init_std: float = Field(0.001, gt=0)
    transforms: TransformConfig = TransformConfig(interpolation="bilinear", train_scale=(0.08, 1.0))
    train: TrainConfig = TrainConfig(
        epochs=5,
        batch_size=24,
        drop_last=True,
        amp=False,  # the official runs are fp32
        optimizer=OptimizerConfig(name="adam", lr=0.0028125, weight_decay=0.0, schedule="constant"),
    )


class LAE(Method[LAEConfig]):
    config_class = LAEConfig
    outputs_probabilities = True

    def __init__(self, name: str, config: LAEConfig, backbone):
        super().__init__(name, config, backbone)
        self.adapted = adapted_blocks(backbone.info.depth, config.adapt_blocks)
        if not self.adapted:
            raise ValueError(f"none of the blocks {config.adapt_blocks} exists in a ViT of depth {backbone.info.depth}")
        self.online = PETList(
            build_pet(
                config.pet,
                backbone.embed_dim,
                block=index,
                rank=config.rank,
                length=config.prefix_length,
                compensate=config.compensate,
            )
            for index in self.adapted
        )
        self.offline: PETList | None = None
        self.heads = nn.ModuleList()

    # -- structure ---------------------------------------------------------------------------------
    def prepare_task(self, index: int, num_new: int) -> None:
        """Append the task's head; at task 1 create the offline PETs as a copy of the online ones."""
        head = nn.Linear(self.backbone.embed_dim, num_new, device=self.device)
        nn.init.normal_(head.weight, std=self.config.head_init_std)
        nn.init.zeros_(head.bias)
        self.heads.append(head)
        if index == 1:
            self.offline = copy.deepcopy(self.online).requires_grad_(False)

    @property
    def experts(self) -> list[PETList]:
        return [self.online] if self.offline is None else [self.online, self.offline]

    # -- training ----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """All heads and the online PETs (frozen ones simply get no gradient); offline PETs never."""
        return [*self.heads.parameters(), *self.online.parameters()]

    def on_epoch_start(self, epoch: int) -> None:
        self.online.requires_grad_(not self.pets_frozen(self.task_index, epoch))

    def pets_frozen(self, task_index: int, epoch: int) -> bool:
        return task_index >= 1 and epoch < self.config.freeze_epochs

    def training_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE over the new classes only: old-class logits are sliced away, not pushed down."""
        (features,) = self.expert_features(inputs, [self.online])
        return F.cross_entropy(self.logits(features)[:, self.num_old :], labels - self.num_old)

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        """θ_off ← d·θ_off + (1−d)·θ_on over every entry of the PET state (timm ``ModelEmaV2``)."""
        if self.offline is None:
            return
        decay = self.config.ema_decay
        online = self.online.state_dict()
        for key, offline in self.offline.state_dict().items():
            offline.copy_(offline * decay + (1.0 - decay) * online[key])

    # -- inference ---------------------------------------------------------------------------------
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Concatenation of every task head: the same classifier for both experts."""
        return torch.cat([head(features) for head in self.heads], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """max(softmax_online, softmax_offline) over all seen classes (see the module docstring)."""
        probabilities = [self.logits(f).softmax(dim=1) for f in self.expert_features(pixels, self.experts)]
        return probabilities[0] if len(probabilities) == 1 else torch.maximum(*probabilities)

    def expert_features(self, pixels: torch.Tensor, experts: list[PETList]) -> list[torch.Tensor]:
        """CLS features under each PET set; the blocks before the first adapted one run only once."""
        backbone, first = self.backbone, self.adapted[0]
        shared = backbone.run_blocks(backbone.embed(pixels), stop=first)
        features = []
        for pets in experts:
            with attached(backbone, pets):
                features.append(backbone.final_feature(backbone.run_blocks(shared, start=first)))
        return features


_VARIANTS: dict[PetKind, str] = {
    "adapter": "Adapter (r=5) parallel to MHSA",
    "lora": "KV-LoRA (rank 5)",
    "prefix": "Prefix (10 K/V tokens, compensated)",
}

for _kind, _summary in _VARIANTS.items():
    register_method(
        f"lae_{_kind}",
        LAE,
        partial(LAEConfig, pet=_kind),
        f"LAE with {_summary} on blocks 0-4: online/EMA-offline experts, max-softmax ensemble",
    )
