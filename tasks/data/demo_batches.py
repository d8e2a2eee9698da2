"""Demo data: scikit-learn's digits written as image-folder batches, as a data team would hand them over."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from strata.tasks.data.readers import read_digits


def write_digit_batches(folder: Path, classes_per_batch: int = 2, seed: int = 0) -> list[Path]:
    """``folder/batch-k/{train,test}/<digit>/*.png``, classes in natural order; exact duplicates dropped
    (a batch with duplicate images is rejected by ingestion)."""
    dataset = read_digits("", seed, 0.25)
    batches = []
    for start in range(0, len(dataset.class_names), classes_per_batch):
        names = dataset.class_names[start : start + classes_per_batch]
        root = folder / f"batch-{start // classes_per_batch + 1}"
        seen: set[bytes] = set()
        for split, images in (("train", dataset.train), ("test", dataset.test)):
            for index, (source, label) in enumerate(zip(images.images, images.labels, strict=True)):
                name = dataset.class_names[label]
                pixels = np.asarray(source, dtype=np.uint8)  # read_digits' images are uint8 arrays: no copy
                if name not in names or pixels.tobytes() in seen:
                    continue
                seen.add(pixels.tobytes())
                target = root / split / name / f"{index:04d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(target)
        batches.append(root)
    return batches
