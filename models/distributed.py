"""Data-parallel training without DistributedDataParallel: process group, batch split, gradient averaging.

``torchrun`` starts the processes and ``init_distributed`` joins them. Every process trains on its share of
each global batch (``GlobalBatchSampler``), and ``average_gradients`` replaces each process's gradients by
those of the whole global batch, weighted by the samples each process saw, before the optimizer step. That
is the step one process would take on the whole global batch, so N processes end with the parameters of one
(up to float summation order). DDP itself is not used: a method's loss is not one module's forward, so the
engine does DDP's all-reduce itself, once per step over one flattened buffer. The same sampler serves the
single-process case, where every helper here is a no-op.
"""

from __future__ import annotations

import os

import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import Sampler


def default_device() -> torch.device:
    """The GPU of this process (``LOCAL_RANK`` under torchrun: one GPU per process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, number of processes) of the data-parallel group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True in the one process that writes reports and checkpoints (rank 0, or the only process)."""
    return world()[0] == 0


def init_distributed() -> None:
    """Join the process group ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU).

    Without ``WORLD_SIZE`` > 1 it does nothing; ``world()`` then reports a single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")


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
