"""What every benchmark script shares: synthetic tasks, timing, peak memory, the machine, JSON output.

Timings on a shared CPU are noisy, so scripts report medians of several repeats and always a baseline
measured in the same process, and the figures that matter are the ratios against it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from strata.models.backbones import Backbone, build_backbone
from strata.models.engine import Engine
from strata.models.streams import Task

TINY = "tiny"
VIT_B16 = "vit_base_patch16_224.augreg_in21k"
MEMORY_METHOD = (
    "CPU: peak RSS above the RSS before the step (getrusage ru_maxrss after resetting the kernel's "
    "high-water mark via /proc/self/clear_refs); CUDA: torch.cuda.max_memory_allocated delta"
)


class TensorImages(Dataset):
    """Already-transformed synthetic images that stand in for ``LabelledImages``.

    ``with_transform`` returns the same tensors, so a method's real ``fit_task`` runs unchanged while
    the timings leave out JPEG decoding and PIL augmentation (measured separately, if at all).
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels[index], int(self.labels[index])

    def with_transform(self, _transform) -> TensorImages:
        return self


def synthetic_tasks(
    num_tasks: int, classes_per_task: int, images_per_task: int, image_size: int, seed: int = 0
) -> list[Task]:
    """``num_tasks`` tasks of random pixels in [0, 1], classes assigned round-robin."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for index in range(num_tasks):
        ids = tuple(range(index * classes_per_task, (index + 1) * classes_per_task))
        labels = torch.tensor([ids[i % classes_per_task] for i in range(images_per_task)])
        images = TensorImages(torch.rand(images_per_task, 3, image_size, image_size, generator=generator), labels)
        tasks.append(Task(index, ids, tuple(f"class{c}" for c in ids), images, images))
    return tasks


def backbone(name: str) -> Backbone:
    """The tiny test ViT, or any timm ViT with random-init weights (throughput does not need pretraining)."""
    return build_backbone(name, pretrained=False)


def engine(**kwargs) -> Engine:
    return Engine("cpu" if not torch.cuda.is_available() else None, seed=0, show_progress=False, **kwargs)


def call_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall time of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one untimed warm-up call."""
    return statistics.median(call_seconds(fn, repeats))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object]) -> tuple[object, int | None]:
    """``fn()`` and its peak resident memory above the RSS before it, in bytes.

    CPU peak = getrusage's ``ru_maxrss`` after the kernel's high-water mark was reset to the current RSS
    right before ``fn`` (tracemalloc does not see PyTorch's allocations). None where the reset is not
    possible (not Linux), since a process-wide maximum would then include earlier work.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        return result, torch.cuda.max_memory_allocated() - before
    if not _reset_peak_rss():
        return fn(), None
    before = _rss_bytes()
    result = fn()
    return result, max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, 0)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def machine() -> dict:
    """Where the figures come from: they are only comparable on the same machine."""
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes sharing the CPU skew timings
    }


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every script has."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--backbone", default=TINY, help=f"{TINY} (32 px) or a timm ViT name such as {VIT_B16}")
    result.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return result


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def emit(document: dict) -> None:
    """The one JSON document a script prints (progress, if any, goes to stderr)."""
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
