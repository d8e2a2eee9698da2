"""Dataset readers: turn data on disk (or shipped with a package) into a LabelledDataset.

Specs are ``NAME`` or ``NAME:ARG``: ``digits`` (scikit-learn's real handwritten digits),
``cifar100:DIR`` (the CIFAR-100 python pickles in DIR), ``folder:DIR`` (an ImageFolder tree) and
``synthetic[:CLASSES]`` (generated images for tests).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from strata.models.errors import UserError
from strata.models.images import IMAGE_SUFFIXES, ImageError, inspect
from strata.models.streams import LabelledDataset, LabelledImages


class DatasetError(UserError, ValueError):
    """The data cannot be read as asked; the message names the path and the fix."""


def read_dataset(spec: str, seed: int = 0, test_fraction: float = 0.25) -> LabelledDataset:
    """Read the dataset named by ``spec`` (see the module docstring)."""
    name, _, argument = spec.partition(":")
    if name not in READERS:
        raise DatasetError(f"unknown dataset {spec!r}; use one of: digits, cifar100:DIR, folder:DIR, synthetic[:N]")
    return READERS[name](argument, seed, test_fraction)


def stratified_split(images: list, labels: np.ndarray, test_fraction: float, seed: int):
    """Seeded stratified train/test split (every class keeps samples on both sides)."""
    indices = np.arange(len(labels))
    train_idx, test_idx = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=labels)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (
        LabelledImages([images[i] for i in train_idx], labels[train_idx]),
        LabelledImages([images[i] for i in test_idx], labels[test_idx]),
    )


def read_digits(argument: str, seed: int, test_fraction: float) -> LabelledDataset:
    """scikit-learn's 1,797 8×8 handwritten digits (0–16 grey levels), as uint8 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.round(image * (255 / 16)).astype(np.uint8) for image in digits.images]
    train, test = stratified_split(images, digits.target.astype(np.int64), test_fraction, seed)
    return LabelledDataset("digits", tuple(str(c) for c in range(10)), train, test)


def read_synthetic(argument: str, seed: int, test_fraction: float) -> LabelledDataset:
    """Coloured shapes on noise, one colour/shape pair per class; made for fast tests."""
    num_classes = int(argument or 6)
    per_class = 12
    rng = np.random.default_rng(seed)
    images, labels = [], []
    yy, xx = np.mgrid[0:32, 0:32]
    for c in range(num_classes):
        colour = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 31 + 160) % 256])
        for _ in range(per_class):
            cx, cy = rng.integers(8, 24, size=2)
            mask = (
                ((xx - cx) ** 2 + (yy - cy) ** 2) < (4 + c % 4 * 2) ** 2
                if c % 2
                else (abs(xx - cx) < 4 + c % 3 * 2) & (abs(yy - cy) < 4 + c % 3 * 2)
            )
            image = rng.integers(0, 60, size=(32, 32, 3))
            image[mask] = colour
            images.append(image.astype(np.uint8))
            labels.append(c)
    train, test = stratified_split(images, np.array(labels), test_fraction, seed)
    return LabelledDataset(f"synthetic{num_classes}", tuple(f"class{c}" for c in range(num_classes)), train, test)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's dicts of lists and numpy arrays, and refuses everything else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(
            f"CIFAR-100 file {path} is missing; DIR must hold 'train', 'test' and 'meta' from cifar-100-python.tar.gz"
        )
    try:
        return _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(f"cannot read CIFAR-100 file {path}: {exc}") from exc


def read_cifar100(argument: str, seed: int, test_fraction: float) -> LabelledDataset:
    """CIFAR-100 from the python pickles (``train``, ``test``, ``meta``) in a local folder."""
    if not argument:
        raise DatasetError("cifar100 needs its folder: --dataset cifar100:/path/to/cifar-100-python")
    root = Path(argument)
    meta = _read_cifar_pickle(root / "meta")
    names = tuple(n.decode() for n in meta[b"fine_label_names"])
    splits = []
    for split in ("train", "test"):
        raw = _read_cifar_pickle(root / split)
        pixels = np.asarray(raw[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits.append(LabelledImages(list(pixels), np.asarray(raw[b"fine_labels"], dtype=np.int64)))
    return LabelledDataset("cifar100", names, splits[0], splits[1])


def read_image_folder(argument: str, seed: int, test_fraction: float) -> LabelledDataset:
    """``DIR/class/*.jpg`` (seeded stratified split) or ``DIR/train/class/…`` + ``DIR/test/class/…``."""
    if not argument:
        raise DatasetError("folder needs its path: --dataset folder:/path/to/images")
    root = Path(argument)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a directory")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files = _class_files(root / "train")
        test_files = _class_files(root / "test")
        if set(train_files) != set(test_files):
            raise DatasetError(
                f"{root}/train and {root}/test have different classes: {sorted(set(train_files) ^ set(test_files))}"
            )
        names = tuple(sorted(train_files))
        train = _labelled(train_files, names)
        test = _labelled(test_files, names)
    else:
        files = _class_files(root)
        names = tuple(sorted(files))
        everything = _labelled(files, names)
        train, test = stratified_split(everything.images, everything.labels, test_fraction, seed)
    return LabelledDataset(root.name, names, train, test)


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders; expected {root}/<class>/<image files>")
    files = {}
    for folder in classes:
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for path in images:
            _check_image(path)
        files[folder.name] = images
    return files


def _check_image(path: Path) -> None:
    """The decoder's checks short of decoding (format, size, integrity): a bad file is named now, not in training."""
    try:
        inspect(path)
    except ImageError as exc:
        raise DatasetError(f"unreadable image {path}: {exc}; remove or replace it") from exc


def _labelled(files: dict[str, list[Path]], names: tuple[str, ...]) -> LabelledImages:
    images: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        images.extend(str(p) for p in files[name])
        labels.extend([label] * len(files[name]))
    return LabelledImages(images, labels)


READERS: dict[str, Callable[[str, int, float], LabelledDataset]] = {
    "digits": read_digits,
    "cifar100": read_cifar100,
    "folder": read_image_folder,
    "synthetic": read_synthetic,
}
