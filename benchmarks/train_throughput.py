"""Training throughput (images/s) and peak memory of every method's task-0 and task-t steps.

Each method runs its real ``fit_task`` on pre-transformed synthetic images through the shared engine;
an epoch's wall time comes from the engine's end-of-epoch callback and the median epoch is reported.
Training-free steps (SimpleCIL, APER after task 0) report their prototype-extraction rate instead.
The baseline, measured in the same run, is a linear head trained on the frozen backbone (no gradient
through the backbone); every figure is also given as a ratio against it.
To make the task-t step the adapted one, LAE runs without its PET freeze epochs and OVOR without its
VOR epochs (both are cheaper: head only). ``STRATA_OFFICIAL_LAE``/``_APER``/``_OVOR`` name official
checkouts whose same steps are timed in the same run, with the ratio Strata / official per method (see
:mod:`benchmarks.official`).

    python -m benchmarks.train_throughput                       # tiny ViT, 32 px
    python -m benchmarks.train_throughput --backbone vit_base_patch16_224.augreg_in21k --batch-size 2
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common, official
from strata.models.backbones import Backbone
from strata.models.engine import OptimizerConfig, TrainConfig, TrainingHooks
from strata.models.methods import create_method
from strata.models.methods.base import Method

METHODS = [
    "simplecil",
    "aper_adapter",
    "aper_ssf",
    "aper_vpt_shallow",
    "aper_vpt_deep",
    "aper_finetune",
    "lae_adapter",
    "lae_lora",
    "lae_prefix",
    "ovor",
]
CLASSES_PER_TASK = 4


class LinearProbe(nn.Module, TrainingHooks):
    """The baseline: frozen-backbone forward without autograd, then a linear head's forward and backward."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def training_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(inputs)
        return F.cross_entropy(self.head(features), labels)


class EpochClock:
    """Engine ``on_epoch_end`` callback that records each epoch's wall time."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.durations: list[float] = []

    def __call__(self, _report) -> None:
        now = time.perf_counter()
        self.durations.append(now - self.start)
        self.start = now

    def median(self) -> float | None:
        return sorted(self.durations)[len(self.durations) // 2] if self.durations else None


def train_config(epochs: int, batch_size: int) -> dict:
    return {"epochs": epochs, "batch_size": batch_size, "drop_last": True}


def overrides(name: str, epochs: int, batch_size: int) -> dict:
    """Short epochs of ``batch_size``; LAE without freeze epochs and OVOR without VOR epochs (see above)."""
    result = {"train": train_config(epochs, batch_size), "eval_batch_size": batch_size}
    if name.startswith("lae_"):
        result["freeze_epochs"] = 0
    if name == "ovor":
        result["vor_epochs"] = 0
    return result


def timed_step(fit, images: int, batch_size: int) -> dict:
    """Run ``fit(engine)`` once; images/s from the median epoch, or from the whole call when it trains nothing."""
    clock = EpochClock()
    engine = common.engine(on_epoch_end=clock)
    start = time.perf_counter()
    _, peak = common.peak_memory(lambda: fit(engine))
    total = time.perf_counter() - start
    if clock.durations:
        per_epoch = images // batch_size * batch_size
        return {"kind": "train", "images_per_s": round(per_epoch / clock.median(), 2), "peak_bytes": peak}
    return {"kind": "prototypes", "images_per_s": round(images / total, 2), "peak_bytes": peak}


def baseline(backbone: Backbone, tasks, epochs: int, batch_size: int) -> dict:
    probe = LinearProbe(backbone, CLASSES_PER_TASK)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        drop_last=True,
        optimizer=OptimizerConfig(name="adam", lr=1e-3, schedule="constant"),
    )
    images = len(tasks[0].train)
    timed_step(lambda engine: engine.fit(probe, tasks[0].train, config), images, batch_size)  # warm-up
    return timed_step(lambda engine: engine.fit(probe, tasks[0].train, config), images, batch_size)


def method_steps(method: Method, tasks, batch_size: int) -> dict:
    """The task-0 step, then the task-1 step (LAE's offline expert exists from task 1 on)."""
    result = {}
    for task, label in zip(tasks, ("task_0", "task_t"), strict=True):
        method.begin_task(task)
        result[label] = timed_step(lambda engine, task=task: method.fit_task(task, engine), len(task.train), batch_size)
    return result


def median_step(runs: list[dict]) -> dict:
    """The repeat with the median images/s (its peak memory with it), and every repeat's rate."""
    ranked = sorted(runs, key=lambda run: run["images_per_s"])
    return {**ranked[len(ranked) // 2], "per_repeat": [run["images_per_s"] for run in runs]}


def with_ratios(step: dict, reference: dict) -> dict:
    return {**step, "vs_baseline": common.ratio(step["images_per_s"], reference["images_per_s"])}


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per step measurement (median reported)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved Strata/official repeats per method (medians reported)"
    )
    args = parser.parse_args(argv)
    common.setup(args)
    backbone = common.backbone(args.backbone)
    images = args.batch_size * args.steps
    tasks = common.synthetic_tasks(2, min(CLASSES_PER_TASK, images), images, backbone.image_size)
    reference = baseline(backbone, tasks, args.epochs, args.batch_size)
    config = {
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "epochs": args.epochs,
        "classes_per_task": CLASSES_PER_TASK,
    }
    ours: dict[str, list[dict]] = {name: [] for name in args.methods}
    theirs: dict[str, list[dict]] = {name: [] for name in args.methods}
    for _ in range(args.repeats):
        for name in args.methods:  # Strata's step, then the official one: both see the same spell of the machine
            method = create_method(name, backbone, overrides=overrides(name, args.epochs, args.batch_size))
            ours[name].append(method_steps(method, tasks, args.batch_size))
            del method
            theirs[name].append(official.measure(name, config))
    methods = {
        name: {label: with_ratios(median_step([run[label] for run in runs]), reference) for label in runs[0]}
        for name, runs in ours.items()
    }
    document = {
        "benchmark": "train_throughput",
        "machine": common.machine(),
        "config": {
            "backbone": args.backbone,
            "image_size": backbone.image_size,
            "batch_size": args.batch_size,
            "steps_per_epoch": args.steps,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "weights": "random-init",
            "memory": common.MEMORY_METHOD,
        },
        "baseline": {"what": "frozen backbone forward (no grad) + linear head forward/backward/Adam step", **reference},
        "methods": methods,
        "official": {name: official.summarise(theirs[name], ours[name]) for name in args.methods},
    }
    common.emit(document)
    return document


if __name__ == "__main__":
    main()
