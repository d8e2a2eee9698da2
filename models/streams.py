"""The data model of a class-incremental stream.

A stream is an ordered list of tasks; each task introduces new classes and carries their train and
test samples. Labels inside a stream are *learning-order ids*: the classes of task t are the
contiguous range [C_old, C_seen), as in all three reference codes (which remap labels through the
class order), so that heads can slice logits by task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from strata.models.errors import UserError
from strata.models.images import ImageError, decode, to_rgb

ImageSource = str | Path | np.ndarray  # a file path, or an HxW / HxWxC uint8 array


class StreamError(UserError, ValueError):
    """A stream cannot be built from this data; the message names the problem."""


class LabelledImages(Dataset):
    """Images with integer labels, decoded lazily, with an optional transform."""

    def __init__(
        self,
        images: Sequence[ImageSource],
        labels: Sequence[int] | np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ):
        if len(images) != len(labels):
            raise StreamError(f"{len(images)} images but {len(labels)} labels")
        self.images = list(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        """The transformed image (the decoded PIL image when there is no transform) and its label."""
        image = load_image(self.images[index])
        pixels = self.transform(image) if self.transform is not None else image
        return pixels, int(self.labels[index])

    def with_transform(self, transform: Callable | None) -> LabelledImages:
        return LabelledImages(self.images, self.labels, transform)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledImages:
        return LabelledImages(
            [self.images[i] for i in indices], self.labels[np.asarray(indices, dtype=int)], self.transform
        )

    def relabel(self, mapping: dict[int, int]) -> LabelledImages:
        return LabelledImages(self.images, [mapping[int(y)] for y in self.labels], self.transform)


def load_image(source: ImageSource) -> Image.Image:
    """Decode one image as RGB with the decoder ingest and serving use; the error names the file that failed."""
    if isinstance(source, np.ndarray):
        return to_rgb(Image.fromarray(source))
    try:
        return decode(source)
    except (ImageError, OSError) as exc:
        raise StreamError(f"cannot read image {source}: {exc}") from exc


@dataclass(frozen=True)
class LabelledDataset:
    """What a reader returns: class names and train/test samples labelled by class index."""

    name: str
    class_names: tuple[str, ...]
    train: LabelledImages
    test: LabelledImages
    # Identity of the samples by content (a data version's DVC md5), set only by readers whose data are
    # content-addressed; empty means "unknown", and then no features of it are ever cached.
    content_key: str = ""


@dataclass(frozen=True)
class Task:
    """One increment: its new classes (learning-order ids) and their samples."""

    index: int
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    train: LabelledImages
    test: LabelledImages
    # Content identity of the task's samples (the batch's ``content_key``); "" disables feature caching.
    data_key: str = ""

    @property
    def num_old(self) -> int:
        return self.class_ids[0]

    @property
    def num_new(self) -> int:
        return len(self.class_ids)

    @property
    def num_seen(self) -> int:
        return self.class_ids[-1] + 1


@dataclass(frozen=True)
class Stream:
    """An ordered list of tasks; ``class_names[i]`` is the name of learning-order id ``i``."""

    name: str
    tasks: tuple[Task, ...]
    class_names: tuple[str, ...]

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


def class_order(num_classes: int, order: str = "seeded", seed: int = 1993) -> list[int]:
    """The order in which classes are learned.

    ``seeded`` is APER/PyCIL's ``np.random.seed(seed); np.random.permutation(n)`` (seed 1993 by
    default); ``natural`` keeps the dataset's class index order (LAE, OVOR seed 0).
    """
    if order == "natural":
        return list(range(num_classes))
    if order == "seeded":
        return np.random.RandomState(seed).permutation(num_classes).tolist()
    raise StreamError(f"unknown class order {order!r}; use 'seeded' or 'natural'")


def task_sizes(num_classes: int, base: int, increment: int) -> list[int]:
    """Classes per task for B{base}-Inc{increment}: base 0 means the first task is one increment."""
    if increment <= 0 or base < 0:
        raise StreamError(f"increment must be > 0 and base >= 0 (got base={base}, increment={increment})")
    first = base or increment
    if num_classes < first + increment:
        raise StreamError(
            f"B{base}-Inc{increment} needs at least {first + increment} classes for two tasks, "
            f"but the dataset has {num_classes}"
        )
    sizes = [first]
    while sum(sizes) < num_classes:
        sizes.append(min(increment, num_classes - sum(sizes)))
    return sizes


def split_by_classes(
    dataset: LabelledDataset,
    base: int,
    increment: int,
    order: str = "seeded",
    seed: int = 1993,
    num_tasks: int | None = None,
) -> Stream:
    """Split a labelled dataset into a B{base}-Inc{increment} class-incremental stream."""
    permutation = class_order(len(dataset.class_names), order, seed)
    sizes = task_sizes(len(permutation), base, increment)[:num_tasks]
    to_learning_id = {original: new for new, original in enumerate(permutation)}
    train = dataset.train.relabel(to_learning_id)
    test = dataset.test.relabel(to_learning_id)
    names = tuple(dataset.class_names[c] for c in permutation)
    tasks, start = [], 0
    for index, size in enumerate(sizes):
        ids = tuple(range(start, start + size))
        tasks.append(
            Task(
                index,
                ids,
                names[start : start + size],
                train.subset(np.flatnonzero(np.isin(train.labels, ids))),
                test.subset(np.flatnonzero(np.isin(test.labels, ids))),
            )
        )
        start += size
    return Stream(dataset.name, tuple(tasks), names[:start])


def stream_from_batches(name: str, batches: Sequence[LabelledDataset]) -> Stream:
    """One task per batch, in the given order (the data team's ingested batches)."""
    tasks: list[Task] = []
    names: list[str] = []
    for index, batch in enumerate(batches):
        clash = set(batch.class_names) & set(names)
        if clash:
            raise StreamError(f"batch {batch.name!r} repeats classes already learned: {sorted(clash)}")
        offset = len(names)
        mapping = {i: offset + i for i in range(len(batch.class_names))}
        ids = tuple(range(offset, offset + len(batch.class_names)))
        tasks.append(
            Task(
                index,
                ids,
                batch.class_names,
                batch.train.relabel(mapping),
                batch.test.relabel(mapping),
                data_key=batch.content_key,
            )
        )
        names.extend(batch.class_names)
    return Stream(name, tuple(tasks), tuple(names))
