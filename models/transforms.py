"""Train and test transforms, exactly as the reference codes build them.

No mean/std normalisation: the ViT sees ``ToTensor()`` values in [0, 1]. Interpolation matters
(bicubic vs bilinear moves CIFAR-100 by about 1.5 points), so it is part of every method's config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from torchvision import transforms as T

INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


class TransformConfig(BaseModel):
    """How images become tensors. Defaults are APER/SimpleCIL's (``utils/data.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    train_scale: tuple[float, float] = (0.05, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Test: Resize(size * test_resize_ratio) then CenterCrop(size); ratio 1.0 means Resize(size) only
    # (OVOR's CIFAR test transform).
    test_resize_ratio: float = 256 / 224


def train_transform(config: TransformConfig, size: int) -> T.Compose:
    """RandomResizedCrop + horizontal flip + ToTensor."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                size,
                scale=config.train_scale,
                ratio=config.train_ratio,
                interpolation=INTERPOLATION[config.interpolation],
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
        ]
    )


def test_transform(config: TransformConfig, size: int) -> T.Compose:
    """Resize (+ CenterCrop) + ToTensor; also used for prototypes of training images."""
    interpolation = INTERPOLATION[config.interpolation]
    if config.test_resize_ratio == 1.0:
        return T.Compose([T.Resize((size, size), interpolation=interpolation), T.ToTensor()])
    return T.Compose(
        [
            T.Resize(int(size * config.test_resize_ratio), interpolation=interpolation),
            T.CenterCrop(size),
            T.ToTensor(),
        ]
    )
