"""OVOR: OnePrompt with Virtual Outlier Regularization (ICLR 2024, jpmorganchase/ovor).

One shared set of prefix prompts (never reset) and one linear head over all seen classes are
trained on every task with CE, old-class logits masked to −∞ (rehearsal-free). The last
``vor_epochs`` of each task train only the head on cached features of the task's training images
(train transform) plus synthesised virtual outliers, adding the energy loss L_VOR, which tightens
the current task's decision regions so its logits do not swamp old classes. ``oneprompt`` is the
same method without VOR epochs. Inference is one prompted forward pass (no query pass); the prompts
are attached to the backbone only for the duration of each forward.

Epochs: ``train.epochs`` is the total K of the CODA-P cosine schedule (regular + VOR); the
optimizer is re-created per task. Defaults are the official CIFAR-100 run (``--epochs 0 16 4``);
the warm-up phase of the official code (0 epochs by default) is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from strata.models.backbones import weights_fingerprint
from strata.models.engine import Engine, OptimizerConfig, TrainConfig
from strata.models.heads import GrowingLinear
from strata.models.methods.base import Method, MethodConfig
from strata.models.methods.registry import register_method
from strata.models.ood import OutlierConfig, VORLossConfig, synthesize_outliers, vor_loss
from strata.models.pet.attach import attached
from strata.models.pet.oneprompt import DEFAULT_LENGTHS, OnePrompt
from strata.models.streams import Task
from strata.models.transforms import TransformConfig

OUTLIER_LABEL = -1  # marks outlier rows in a VOR batch


def _train(epochs: int) -> TrainConfig:
    """Adam 1e-3, batch 128, CODA-P cosine over all epochs (``learners/default.py``)."""
    return TrainConfig(
        epochs=epochs,
        batch_size=128,
        optimizer=OptimizerConfig(name="adam", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, schedule="coda_cosine"),
    )


class OVORConfig(MethodConfig):
    # torchvision defaults (bilinear, RRC scale (0.08, 1)); CIFAR profiles set test_resize_ratio 1.0.
    transforms: TransformConfig = TransformConfig(interpolation="bilinear", train_scale=(0.08, 1.0))
    train: TrainConfig = _train(20)
    vor_epochs: int = Field(4, ge=0, description="the last vor_epochs of train.epochs are VOR epochs")
    prompt_lengths: dict[int, int] = DEFAULT_LENGTHS
    outliers: OutlierConfig = OutlierConfig()
    vor_loss: VORLossConfig = VORLossConfig()

    @model_validator(mode="after")
    def _vor_within_epochs(self) -> OVORConfig:
        if self.vor_epochs > self.train.epochs:
            raise ValueError(
                f"vor_epochs ({self.vor_epochs}) exceeds train.epochs ({self.train.epochs}), "
                f"which counts regular and VOR epochs together"
            )
        return self


def mask_old_classes(logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """Old-class logits set to −∞: CE on the new task's data then never pushes old classes down."""
    return logits.index_fill(1, torch.arange(num_old, device=logits.device), float("-inf"))


class OVOR(Method[OVORConfig]):
    config_class = OVORConfig

    def __init__(self, name: str, config: OVORConfig, backbone):
        super().__init__(name, config, backbone)
        self.prompt = OnePrompt(backbone, config.prompt_lengths)
        self.head = GrowingLinear(backbone.embed_dim)
        self._fitting: tuple[Task, Engine] | None = None
        self._vor_epoch = False

    def prepare_task(self, index: int, num_new: int) -> None:
        self.head.grow(num_new)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.prompt.parameters(), *self.head.parameters()]

    def is_vor_epoch(self, epoch: int) -> bool:
        return epoch >= self.config.train.epochs - self.config.vor_epochs

    def fit_task(self, task: Task, engine: Engine) -> list[float]:
        self._fitting = (task, engine)
        try:
            return super().fit_task(task, engine)
        finally:
            self._fitting, self._vor_epoch = None, False

    def on_epoch_start(self, epoch: int) -> None:
        self._vor_epoch = self.is_vor_epoch(epoch)

    def epoch_batches(self, epoch: int, loader):
        return self.vor_batches(epoch) if self._vor_epoch else loader

    def training_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self._vor_epoch:
            return F.cross_entropy(mask_old_classes(self(inputs), self.num_old), labels)
        logits = self.head(inputs)  # cached features: only the head gets gradients
        outlier = labels == OUTLIER_LABEL
        ce = F.cross_entropy(mask_old_classes(logits[~outlier], self.num_old), labels[~outlier])
        current = logits[:, self.num_old :]
        return ce + vor_loss(current[~outlier], current[outlier], self.config.vor_loss)

    def vor_batches(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One VOR epoch: features of every training image (train transform, extracted once, no grad),
        shuffled ID batches of ``batch_size`` zipped with unshuffled outlier batches of
        ``n_ood // n_batches``; each batch is ID features then outliers labelled ``OUTLIER_LABEL``."""
        if self._fitting is None:
            raise RuntimeError(f"{self.name} draws VOR batches only while fit_task runs")
        task, engine = self._fitting
        transform = self.train_transform()
        # Random crops: cacheable only for an identical re-run. The key holds the prompts' current values
        # and the engine adds torch's RNG state, seed and workers (``random_transform=True``).
        features, labels = engine.extract(
            self.features,
            task.train.with_transform(transform),
            self.config.eval_batch_size,
            self.feature_cache_key(task, transform, "train"),
            random_transform=True,
        )
        features, labels = features.to(engine.device).clone(), labels.to(engine.device).clone()
        generator = torch.Generator().manual_seed(engine.seed + 1000 * task.index + epoch)
        outliers = synthesize_outliers(features, task.num_new, self.config.outliers, generator)
        id_batches = (
            torch.randperm(len(features), generator=generator).to(engine.device).split(self.config.train.batch_size)
        )
        ood_batches = outliers.split(max(len(outliers) // len(id_batches), 1))
        # zip stops at the shorter loader, as in the official code (the remainder outliers are unused).
        return [
            (torch.cat([features[rows], ood]), torch.cat([labels[rows], labels.new_full((len(ood),), OUTLIER_LABEL)]))
            for rows, ood in zip(id_batches, ood_batches, strict=False)
        ]

    def feature_identity(self) -> str:
        """The prompted backbone (weights and structure, prompts attached) and the prompts' current values."""
        with attached(self.backbone, self.prompt):
            prompted = super().feature_identity()
        return f"{prompted}:prompts={weights_fingerprint(self.prompt)}"

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The CLS feature of the prompted backbone."""
        with attached(self.backbone, self.prompt):
            return self.backbone(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


register_method(
    "ovor",
    OVOR,
    OVORConfig,
    "OnePrompt + virtual outlier regularization: shared prefix prompts, one linear head, VOR epochs",
)
register_method(
    "oneprompt",
    OVOR,
    lambda: OVORConfig(train=_train(50), vor_epochs=0),
    "OnePrompt without VOR: shared prefix prompts and one linear head, 50 epochs",
)
