"""The frozen-feature cache protocol and the keys it is addressed by.

``Engine.extract`` can be served from a :class:`FeatureCache` when the caller gives a content key (see
``Method.feature_cache_key``, which names the data, the feature function and the transform by content).
:func:`extraction_key` adds what else decides the result: the device type, the batch size and, for random
transforms, the seed, the loader workers and torch's RNG state. Nothing is ever keyed by object identity.
``models`` only defines the protocol; the disk store is in ``tasks``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


class FeatureCache(Protocol):
    """A content-keyed store of extracted features: ``{"features", "labels"[, "rng_after"]}`` per key.

    ``get`` returns None for a key it does not hold or cannot read (the engine then recomputes).
    """

    def get(self, key: str) -> dict[str, torch.Tensor] | None: ...

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None: ...


def extraction_key(
    content_key: str, device: torch.device, batch_size: int, random_transform: bool, seed: int, num_workers: int
) -> str:
    """The cache key of one extraction: the caller's content key plus how the engine runs it.

    With a random transform the result also depends on the seed, the workers and torch's global RNG state
    as it is now (torchvision's random transforms draw from it), so those are part of the key.
    """
    digest = hashlib.sha256()
    for part in (content_key, device.type, str(batch_size), str(random_transform)):
        digest.update(part.encode() + b"\0")
    if random_transform:
        digest.update(f"{seed}\0{num_workers}\0".encode())
        digest.update(torch.get_rng_state().numpy().tobytes())
    return digest.hexdigest()


def load_features(
    cache: FeatureCache, key: str, size: int, random_transform: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached ``(features, labels)`` of ``size`` samples, or None when absent or not fitting.

    For a random transform a hit restores the RNG state the extraction would have left, so that everything
    after it runs exactly as without the cache.
    """
    entry = cache.get(key)
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
    if rng_after is not None and random_transform:
        torch.set_rng_state(rng_after)
    return features.float(), labels.long()


def store_features(
    cache: FeatureCache, key: str, features: torch.Tensor, labels: torch.Tensor, random_transform: bool
) -> None:
    """Store an extraction (with the RNG state it left, for a random transform); a failure only warns."""
    entry = {"features": features, "labels": labels}
    if random_transform:
        entry["rng_after"] = torch.get_rng_state()
    try:
        cache.put(key, entry)
    except Exception as exc:  # a cache that cannot store must not fail the training
        logger.warning("could not store features under %s: %s: %s", key[:12], type(exc).__name__, exc)
