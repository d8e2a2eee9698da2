"""The one training loop every method shares, customised through hooks.

A method never writes its own loop: it says which parameters train (``trainable_parameters``),
what the loss of a batch is (``training_loss``), and optionally what happens at epoch start (LAE's
freeze schedule), which batches an epoch sees (OVOR's cached-feature VOR epochs) and what follows
each optimizer step (LAE's EMA). The engine owns the optimizer, the schedule, batching, bf16
autocast on GPU and progress reporting.

Data-parallel training: when ``torch.distributed`` is initialised (``torchrun`` starts the processes and
``init_distributed`` joins them), every process trains on its share of each global batch and the
gradients are averaged across processes before each optimizer step, weighted by the samples each
process saw. That is the step one process would take on the whole global batch, so N processes end
with the parameters of one (up to float summation order). DistributedDataParallel itself is not used:
a method's loss is not one module's forward, so the engine does DDP's all-reduce itself, once per step
over one flattened buffer. The global batch is split by one sampler (``GlobalBatchSampler``) that also
serves the single-process case.

Frozen-feature extraction (``Engine.extract``) can be served from a :class:`FeatureCache` when the
caller gives a content key (see ``Method.feature_cache_key``): the engine adds what else decides the
result (device, batch size and, for random transforms, the seed, the workers and torch's RNG state) and
never keys by object identity. ``models`` only defines the protocol; the disk store is in ``tasks``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


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


class FeatureCache(Protocol):
    """A content-keyed store of extracted features: ``{"features", "labels"[, "rng_after"]}`` per key.

    ``get`` returns None for a key it does not hold or cannot read (the engine then recomputes).
    """

    def get(self, key: str) -> dict[str, torch.Tensor] | None: ...

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None: ...


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU per process
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, number of processes) of the data-parallel group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True in the one process that writes reports and checkpoints (rank 0, or the only process)."""
    return world()[0] == 0


def init_distributed() -> bool:
    """Join the process group ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU).

    Returns whether this process is one of several; without ``WORLD_SIZE`` > 1 it does nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


class GlobalBatchSampler(Sampler[int]):
    """Indices of this process's share of every global batch of one epoch.

    One seeded permutation per epoch, cut into global batches of ``batch_size``; each global batch is cut
    into ``world_size`` contiguous shares, the first ones one larger when it does not divide evenly. With
    one process it is the whole batch, so one sampler serves both cases and N processes see exactly the
    samples one process sees. A last global batch smaller than the number of processes is dropped when
    there are several (a process with nothing would stall the all-reduce), as is any partial batch with
    ``drop_last``.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
    ):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def local_batches(self) -> list[list[int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        batches = []
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size].tolist()
            share, extra = divmod(len(batch), self.world_size)
            first = self.rank * share + min(self.rank, extra)
            batches.append(batch[first : first + share + (self.rank < extra)])
        return batches

    def __iter__(self):
        return iter(self.local_batches())

    def __len__(self) -> int:
        """Global batches per epoch: the full ones, and the partial one unless it is dropped."""
        full, partial = divmod(self.size, self.batch_size)
        return full + (partial > 0 and not self.drop_last and partial >= self.world_size)


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

    def training_loader(self, dataset: Dataset, config: TrainConfig, seed_offset: int) -> DataLoader:
        """This process's share of each global batch (all of it with one process), reshuffled per epoch."""
        rank, size = world()
        sampler = GlobalBatchSampler(
            len(dataset), config.batch_size, self.seed + seed_offset, rank, size, drop_last=config.drop_last
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

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
        loader = self.training_loader(dataset, config, seed_offset=task_index)
        if isinstance(hooks, nn.Module):
            hooks.train()
        losses = []
        for epoch in range(config.epochs):
            lr = opt.lr * schedule_factor(opt.schedule, epoch, config.epochs, opt.lr, opt.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            hooks.on_epoch_start(epoch)
            loader.batch_sampler.set_epoch(epoch)
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
        key = self._full_cache_key(cache_key, batch_size, random_transform)
        if key is not None:
            hit = self._cached(key, len(dataset), random_transform)  # type: ignore[arg-type]
            if hit is not None:
                self.cache_hits += 1
                return hit
            self.cache_misses += 1
        outputs, labels = [], []
        for inputs, targets in tqdm(
            self.loader(dataset, batch_size), desc="inference", leave=False, disable=not self.show_progress
        ):
            outputs.append(fn(inputs.to(self.device)).float().cpu())
            labels.append(targets)
        if not outputs:
            raise ValueError("cannot run inference on an empty dataset")
        features, labels = torch.cat(outputs), torch.cat(labels)
        if key is not None:
            entry = {"features": features, "labels": labels}
            if random_transform:
                entry["rng_after"] = torch.get_rng_state()
            try:
                self.feature_cache.put(key, entry)  # type: ignore[union-attr]
            except Exception as exc:  # a cache that cannot store must not fail the training
                logger.warning("could not store features under %s: %s: %s", key[:12], type(exc).__name__, exc)
        return features, labels

    def _full_cache_key(self, cache_key: str | None, batch_size: int, random_transform: bool) -> str | None:
        if self.feature_cache is None or not cache_key:
            return None
        digest = hashlib.sha256()
        for part in (cache_key, self.device.type, str(batch_size), str(random_transform)):
            digest.update(part.encode() + b"\0")
        if random_transform:
            digest.update(f"{self.seed}\0{self.num_workers}\0".encode())
            digest.update(torch.get_rng_state().numpy().tobytes())
        return digest.hexdigest()

    def _cached(self, key: str, size: int, random_transform: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.feature_cache.get(key)  # type: ignore[union-attr]
        if entry is None:
            return None
        features, labels = entry.get("features"), entry.get("labels")
        rng_after = entry.get("rng_after")
        if (
            features is None
            or labels is None
            or features.ndim != 2
            or len(features) != size
            or len(labels) != size
            or (random_transform and (rng_after is None or rng_after.dtype != torch.uint8))
        ):
            logger.warning("ignoring the cached features %s: they do not match this extraction", key[:12])
            return None
        if random_transform:
            torch.set_rng_state(rng_after)
        return features.float(), labels.long()


def average_gradients(params: list[nn.Parameter], count: int) -> None:
    """Replace each process's mean-loss gradients by the global batch's: Σ_r n_r·g_r / Σ_r n_r.

    One all-reduce of one flat buffer per step. Parameters without a gradient (frozen this epoch on
    every process alike) are left without one, so the optimizer skips them as it would with one process.
    """
    if world()[1] == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat(
        [g.reshape(-1) * count for g in grads] + [grads[0].new_tensor([float(count)])]
        if grads
        else [torch.tensor([float(count)])]
    )
    dist.all_reduce(flat)
    offset, total = 0, flat[-1]
    for grad in grads:
        grad.copy_((flat[offset : offset + grad.numel()] / total).view_as(grad))
        offset += grad.numel()


def _length(batches: Iterable) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
