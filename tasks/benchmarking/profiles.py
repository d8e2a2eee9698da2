"""Benchmark profiles: named settings that mirror a method's official runs.

A profile fixes the method, protocol, class order, backbone checkpoint and config overrides of a
published run; the user supplies the data (``--dataset``) and, offline, the weights (``--weights``).
Options given on the command line win over the profile.
"""

from __future__ import annotations

from typing import Any

from strata.models.errors import UserError

PROFILES: dict[str, dict[str, Any]] = {}


class UnknownProfileError(UserError, ValueError):
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
register_profile(
    "simplecil-cifar100",
    "SimpleCIL, CIFAR-100 B0-Inc5 (RevisitingCIL)",
    method="simplecil",
    base=0,
    increment=5,
    class_order="seeded",
    seed=1993,
    backbone="vit_base_patch16_224.augreg_in21k",
)
register_profile(
    "simplecil-imagenet-r",
    "SimpleCIL, ImageNet-R B0-Inc5 (RevisitingCIL)",
    method="simplecil",
    base=0,
    increment=5,
    class_order="seeded",
    seed=1993,
    backbone="vit_base_patch16_224.augreg_in21k",
)

# OVOR, jpmorganchase/ovor experiments/*.sh: natural class order for seed 0, AugReg IN-21k→IN-1k ViT-B/16.
# CIFAR-100 runs `--epochs 0 16 4` and tests with Resize(224) only; ImageNet-R runs `--epochs 0 40 10`.
OVOR_BACKBONE = "vit_base_patch16_224.augreg_in21k_ft_in1k"
register_profile(
    "ovor-cifar100",
    "OVOR (OnePrompt + VOR), CIFAR-100 B0-Inc10, 16+4 epochs",
    method="ovor",
    base=0,
    increment=10,
    class_order="natural",
    seed=0,
    backbone=OVOR_BACKBONE,
    overrides={"train": {"epochs": 20}, "vor_epochs": 4, "transforms": {"test_resize_ratio": 1.0}},
)
register_profile(
    "ovor-imagenet-r",
    "OVOR (OnePrompt + VOR), ImageNet-R B0-Inc20, 40+10 epochs",
    method="ovor",
    base=0,
    increment=20,
    class_order="natural",
    seed=0,
    backbone=OVOR_BACKBONE,
    overrides={"train": {"epochs": 50}, "vor_epochs": 10},
)
register_profile(
    "oneprompt-cifar100",
    "OnePrompt without VOR, CIFAR-100 B0-Inc10, 50 epochs",
    method="oneprompt",
    base=0,
    increment=10,
    class_order="natural",
    seed=0,
    backbone=OVOR_BACKBONE,
    overrides={"transforms": {"test_resize_ratio": 1.0}},
)

# LAE, gqk/LAE config/base/{cifar100,imagenet-r}_order1.yaml: order1 = natural class order, seed 1, original
# ViT paper IN-21k ViT-B/16; the method's defaults are the CIFAR-100 recipe (5 epochs, 3 frozen, lr 0.0028125).
LAE_BACKBONE = "vit_base_patch16_224.orig_in21k"
for _pet in ("adapter", "lora", "prefix"):
    register_profile(
        f"lae-{_pet}-cifar100",
        f"LAE ({_pet}), CIFAR-100 B0-Inc10, 5 epochs (gqk/LAE)",
        method=f"lae_{_pet}",
        base=0,
        increment=10,
        class_order="natural",
        seed=1,
        backbone=LAE_BACKBONE,
    )
register_profile(
    "lae-adapter-imagenet-r",
    "LAE (adapter), ImageNet-R B0-Inc20, 50 epochs, 30 frozen (gqk/LAE)",
    method="lae_adapter",
    base=0,
    increment=20,
    class_order="natural",
    seed=1,
    backbone=LAE_BACKBONE,
    overrides={"train": {"epochs": 50, "optimizer": {"lr": 0.00046875}}, "freeze_epochs": 30},
)

# APER/ADAM, RevisitingCIL exps/aper_*: B0-Inc5 on the AugReg IN-21k ViT-B/16, seed-1993 order; each variant's
# defaults are its CIFAR-100 recipe. embed_dim=768 makes a mismatched --backbone fail when the method is built.
for _pet in ("adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"):
    register_profile(
        f"aper-{_pet.replace('_', '-')}-cifar100",
        f"APER ({_pet}), CIFAR-100 B0-Inc5 (RevisitingCIL)",
        method=f"aper_{_pet}",
        base=0,
        increment=5,
        class_order="seeded",
        seed=1993,
        backbone="vit_base_patch16_224.augreg_in21k",
        overrides={"embed_dim": 768},
    )
register_profile(
    "aper-adapter-imagenet-r",
    "APER (adapter), ImageNet-R B0-Inc5, lr 0.05, wd 5e-3, batch 24",
    method="aper_adapter",
    base=0,
    increment=5,
    class_order="seeded",
    seed=1993,
    backbone="vit_base_patch16_224.augreg_in21k",
    overrides={"embed_dim": 768, "train": {"batch_size": 24, "optimizer": {"lr": 0.05, "weight_decay": 5e-3}}},
)
