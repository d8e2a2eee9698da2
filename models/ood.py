"""Virtual outliers and the energy-based VOR loss of OVOR (``learners/ood.py`` of jpmorganchase/ovor).

Outliers are synthesised in feature space from the current task's (normalised) features and scored
by the squared L2 distance to their K-th nearest normalised feature; the highest-scoring candidates
are kept. Two modes:

* ``released`` (default) reproduces the official code: the boundary samples are computed but unused
  (ovor issue #5), so the candidates are ``cov·N(0, I)`` vectors around the origin, tiled once per
  boundary sample;
* ``paper`` is NPOS-style sampling as the paper describes it: each boundary sample plus ``cov·N(0, I)``.

Nearest neighbours use ``torch.cdist`` in chunks instead of FAISS (exact search, same distances).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class OutlierConfig(BaseModel):
    """NPOS hyperparameters; defaults from the official ``run.py`` and ``configs/common.yaml``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["released", "paper"] = "released"
    k: int = Field(50, gt=0)  # K-th nearest neighbour (the query itself counts when it is in the bank)
    select: int = Field(50, gt=0)  # boundary samples
    sample_from: int = Field(600, gt=0)  # Gaussian candidates per boundary sample
    cov: float = Field(0.1, gt=0)  # candidate noise scale
    num_per_class: int = Field(40, gt=0)  # outliers kept per new class
    chunk: int = Field(4096, gt=0)  # candidate rows per cdist call (memory only)


class VORLossConfig(BaseModel):
    """Energy thresholds and weight of L_VOR (``thres_id``, ``thres_ood``, ``lmda``)."""

    model_config = ConfigDict(extra="forbid")

    threshold_id: float = -15.0
    threshold_ood: float = -3.0
    weight: float = 0.1


def kth_neighbour_distance(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Squared L2 distance from each query to its k-th nearest row of ``bank`` (k clipped to the bank size)."""
    k = min(k, len(bank))
    return torch.cat([torch.cdist(part, bank).square().kthvalue(k, dim=1).values for part in queries.split(chunk)])


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores, highest first; ties keep index order (deterministic)."""
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def synthesize_outliers(
    features: torch.Tensor, num_classes: int, config: OutlierConfig, generator: torch.Generator
) -> torch.Tensor:
    """``num_per_class × num_classes`` virtual outliers for the ID ``features`` (n, D) of one task.

    Noise comes from ``generator`` on the CPU, so a seed gives the same outliers on any device.
    """
    bank = F.normalize(features.float(), dim=1)
    boundary = bank[top_indices(kth_neighbour_distance(bank, bank, config.k, config.chunk), config.select)]
    noise = config.cov * torch.randn(config.sample_from, bank.shape[1], generator=generator).to(bank.device)
    count = config.num_per_class * num_classes
    if config.mode == "released":
        # Every boundary sample contributes the same noise rows: score the unique rows, then tile.
        scores = kth_neighbour_distance(noise, bank, config.k, config.chunk).repeat(len(boundary))
        return noise.repeat(len(boundary), 1)[top_indices(scores, count)]
    candidates = (boundary[:, None, :] + noise[None]).flatten(0, 1)
    return candidates[top_indices(kth_neighbour_distance(candidates, bank, config.k, config.chunk), count)]


def energy(logits: torch.Tensor) -> torch.Tensor:
    """E(v) = −log Σ_c exp(z_c): low for in-distribution inputs."""
    return -torch.logsumexp(logits, dim=1)


def vor_loss(id_logits: torch.Tensor, ood_logits: torch.Tensor, config: VORLossConfig) -> torch.Tensor:
    """λ·[Huber(relu(E_id − τ_id)) + Huber(relu(τ_ood − E_ood))] over current-task logits (Huber δ=1, mean)."""
    id_excess = F.relu(energy(id_logits) - config.threshold_id)
    ood_excess = F.relu(config.threshold_ood - energy(ood_logits))
    return config.weight * (
        F.huber_loss(id_excess, torch.zeros_like(id_excess)) + F.huber_loss(ood_excess, torch.zeros_like(ood_excess))
    )
