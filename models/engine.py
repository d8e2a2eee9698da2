"""The one training loop every method shares, customised through hooks.

A method never writes its own loop: it says which parameters train (``trainable_parameters``),
what the loss of a batch is (``training_loss``), and optionally what happens at epoch start (LAE's
freeze schedule), which batches an epoch sees (OVOR's cached-feature VOR epochs) and what follows
each optimizer step (LAE's EMA). The engine owns the optimizer, the schedule, batching, bf16
autocast on GPU and progress reporting.

Data-parallel training under ``torchrun`` (see :mod:`strata.models.distributed`): every process trains
on its share of each global batch and the gradients are averaged across processes before each optimizer
step, so N processes take the steps one process would take on the whole batch.

Frozen-feature extraction (``Engine.extract``) can be served from a
:class:`~strata.models.features.FeatureCache` when the caller gives a content key (see
:mod:`strata.models.features`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sized
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from strata.models.distributed import GlobalBatchSampler, average_gradients, default_device, world
from strata.models.features import FeatureCache, extraction_key, load_features, store_features


class OptimizerConfig(BaseModel):
    """Optimizer and per-epoch learning-rate schedule."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    # cosine: CosineAnnealingLR(T_max=epochs, eta_min=min_lr), stepped per epoch (APER).
    # coda_cosine: lr·cos(99π·e′/(200(K−1))) with e′ = max(e−1, 0): CODA-P's schedule including the
    # off-by-one of OVOR's released code (epochs 0 and 1 both run at the base lr).
    schedule: Literal["constant", "cosine", "coda_cosine"] = "cosine"
    min_lr: float = 0.0


class TrainConfig(BaseModel):
    """How long and on what batches a task trains."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=0)
    batch_size: int = Field(48, gt=0)
    drop_last: bool = False
    optimizer: OptimizerConfig = OptimizerConfig()
    amp: bool = True  # bf16 autocast when training on CUDA; ignored on CPU


class TrainingHooks:
    """What a method overrides to customise the shared loop. Defaults do nothing special."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def training_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's loss, a mean over its samples (data-parallel averaging relies on it)."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (LAE freezes its PETs in the first epochs of later tasks)."""

    def epoch_batches(self, epoch: int, loader: DataLoader) -> Iterable:
        """The batches of one epoch; the default is the image loader."""
        return loader

    def on_optimizer_step(self) -> None:
        """Called after every optimizer step (LAE's EMA of the offline PET)."""


@dataclass(frozen=True)
class EpochReport:
    """Emitted after each epoch so callers can show progress (CLI bar, Prefect artifact)."""

    task: int
    epoch: int
    epochs: int
    loss: float
    lr: float


def schedule_factor(schedule: str, epoch: int, epochs: int, base_lr: float, min_lr: float) -> float:
    """The lr multiplier for ``epoch`` (0-based) out of ``epochs``."""
    if schedule == "constant" or epochs <= 1:
        return 1.0
    if schedule == "cosine":
        lr = min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs)) / 2
        return lr / base_lr
    if schedule == "coda_cosine":
        shifted = max(epoch - 1, 0)
        return math.cos(99 * math.pi * shifted / (200 * (epochs - 1)))
    raise ValueError(f"unknown schedule {schedule!r}")


def make_optimizer(params: list[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so head initialisations and data order repeat."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Engine:
    """Runs training and batched inference for any method on one device."""

    def __init__(
        self,
        device: str | torch.device | None = None,
        seed: int = 0,
        num_workers: int = 0,
        show_progress: bool = True,
        on_epoch_end: Callable[[EpochReport], None] | None = None,
        feature_cache: FeatureCache | None = None,
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.seed = seed
        self.num_workers = num_workers
        self.show_progress = show_progress
        self.on_epoch_end = on_epoch_end
        self.feature_cache = feature_cache
        self.cache_hits = 0
        self.cache_misses = 0

    def loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool = False, drop_last: bool = False, seed_offset: int = 0
    ) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + seed_offset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

    def training_loader(
        self, dataset: Dataset, config: TrainConfig, seed_offset: int
    ) -> tuple[DataLoader, GlobalBatchSampler]:
        """This process's share of each global batch (all of it with one process), and the batch sampler
        that the caller moves to each epoch (``set_epoch``) so that every epoch is reshuffled."""
        rank, size = world()
        sampler = GlobalBatchSampler(
            dataset_size(dataset), config.batch_size, self.seed + seed_offset, rank, size, drop_last=config.drop_last
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )
        return loader, sampler

    def autocast(self, enabled: bool = True):
        if enabled and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def fit(self, hooks: TrainingHooks, dataset: Dataset, config: TrainConfig, task_index: int = 0) -> list[float]:
        """Train for ``config.epochs`` epochs; returns the mean loss of each epoch."""
        params = [p for p in hooks.trainable_parameters()]
        if not params or config.epochs == 0:
            return []
        optimizer = make_optimizer(params, config.optimizer)
        opt = config.optimizer
        loader, sampler = self.training_loader(dataset, config, seed_offset=task_index)
        if isinstance(hooks, nn.Module):
            hooks.train()
        losses = []
        for epoch in range(config.epochs):
            lr = opt.lr * schedule_factor(opt.schedule, epoch, config.epochs, opt.lr, opt.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            hooks.on_epoch_start(epoch)
            sampler.set_epoch(epoch)
            total, count = 0.0, 0
            batches = hooks.epoch_batches(epoch, loader)
            bar = tqdm(
                batches,
                desc=f"task {task_index} epoch {epoch + 1}/{config.epochs}",
                leave=False,
                disable=not self.show_progress,
                total=_length(batches),
            )
            for inputs, labels in bar:
                inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                with self.autocast(config.amp):
                    loss = hooks.training_loss(inputs, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params, len(labels))
                optimizer.step()
                hooks.on_optimizer_step()
                total += float(loss.detach()) * len(labels)
                count += len(labels)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            losses.append(total / max(count, 1))
            if self.on_epoch_end is not None:
                self.on_epoch_end(EpochReport(task_index, epoch, config.epochs, losses[-1], lr))
        if isinstance(hooks, nn.Module):
            hooks.eval()
        return losses

    @torch.inference_mode()
    def extract(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        dataset: Dataset,
        batch_size: int,
        cache_key: str | None = None,
        random_transform: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply ``fn`` to every sample once, in batches, without autograd; results on CPU.

        With a feature cache and a ``cache_key`` (which must identify the data, ``fn`` and the transform by
        content), a stored result is returned instead of running ``fn``. ``random_transform`` says the
        dataset's transform draws from torch's global RNG (torchvision's random transforms do): the key
        then also holds that RNG's state, the seed and the workers, and a hit restores the RNG state the
        computation would have left, so that everything after it runs exactly as without the cache.
        """
        cache, key = self.feature_cache, None
        if cache is not None and cache_key:
            key = extraction_key(cache_key, self.device, batch_size, random_transform, self.seed, self.num_workers)
            hit = load_features(cache, key, dataset_size(dataset), random_transform)
            if hit is not None:
                self.cache_hits += 1
                return hit
            self.cache_misses += 1
        outputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        for inputs, batch_targets in tqdm(
            self.loader(dataset, batch_size), desc="inference", leave=False, disable=not self.show_progress
        ):
            outputs.append(fn(inputs.to(self.device)).float().cpu())
            targets.append(batch_targets)
        if not outputs:
            raise ValueError("cannot run inference on an empty dataset")
        features, labels = torch.cat(outputs), torch.cat(targets)
        if cache is not None and key is not None:
            store_features(cache, key, features, labels, random_transform)
        return features, labels


def dataset_size(dataset: Dataset) -> int:
    """The number of samples of a map-style dataset. torch's ``Dataset`` does not declare ``__len__``, but
    training batches and cached extraction need it; without one, ``len`` would fail the same way."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"object of type {type(dataset).__name__!r} has no len(): a map-style dataset is needed")
    return len(dataset)


def _length(batches: Iterable) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
