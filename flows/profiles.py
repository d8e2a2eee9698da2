"""Benchmark profiles: named settings that mirror a method's official runs.

A profile fixes the method, protocol, class order, backbone checkpoint and config overrides of a
published run; the user supplies the data (``--dataset``) and, offline, the weights (``--weights``).
Options given on the command line win over the profile.
"""

from __future__ import annotations

from typing import Any

PROFILES: dict[str, dict[str, Any]] = {}


class UnknownProfileError(ValueError):
    """The profile name is not registered; the message lists the valid ones."""


def register_profile(name: str, description: str, **params: Any) -> None:
    if name in PROFILES:
        raise ValueError(f"profile {name!r} is registered twice")
    PROFILES[name] = {"description": description, **params}


def profile_params(name: str) -> dict[str, Any]:
    """The BenchmarkParams fields of a profile (without its description)."""
    if name not in PROFILES:
        raise UnknownProfileError(f"unknown profile {name!r}; choose one of {', '.join(sorted(PROFILES)) or '(none)'}")
    return {k: v for k, v in PROFILES[name].items() if k != "description"}


# SimpleCIL, RevisitingCIL exps/simplecil: B0-Inc5/Inc10 on the AugReg IN-21k ViT-B/16, seed-1993 order.
register_profile("simplecil-cifar100", "SimpleCIL, CIFAR-100 B0-Inc5 (RevisitingCIL)", method="simplecil",
                 base=0, increment=5, class_order="seeded", seed=1993,
                 backbone="vit_base_patch16_224.augreg_in21k")
register_profile("simplecil-imagenet-r", "SimpleCIL, ImageNet-R B0-Inc5 (RevisitingCIL)", method="simplecil",
                 base=0, increment=5, class_order="seeded", seed=1993,
                 backbone="vit_base_patch16_224.augreg_in21k")
