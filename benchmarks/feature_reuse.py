"""Frozen-feature reuse: backbone forwards counted when the same increment is learned a second time.

SimpleCIL and APER embed the task's training images for their prototypes, OVOR embeds them for its VOR
epochs; all of these are frozen-backbone features that the content-keyed feature cache
(``strata.tasks.training.feature_cache.DiskFeatureCache``, the one ``strata.flows.learn`` uses under
``.strata/cache/features``)
serves on a second run of the same increment (target: zero forwards). Each method learns the task twice,
each time from the same seed with a freshly built backbone and method, through one cache in a temporary
folder (``--no-cache`` for the uncached count). Forwards are counted as images entering ``patch_embed``
under inference mode; the baseline of the same run is one forward per training image.

    python -m benchmarks.feature_reuse
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from benchmarks import common
from strata.models.engine import seed_everything
from strata.models.methods import create_method
from strata.tasks.training.feature_cache import DiskFeatureCache

METHODS = {  # what in each method is a reusable frozen-backbone feature
    "simplecil": "prototypes (test transform)",
    "aper_adapter": "prototypes of both branches after task-0 adaptation",
    "ovor": "VOR-epoch features (train transform)",
}


class ImageCounter:
    """Counts images through ``patch_embed`` under inference mode, where frozen features are extracted
    (``Engine.extract``); training forwards carry gradients to PETs and are not reusable."""

    def __init__(self, backbone) -> None:
        self.images = 0
        backbone.vit.patch_embed.register_forward_hook(self)

    def __call__(self, _module, args, _output) -> None:
        if torch.is_inference_mode_enabled():
            self.images += len(args[0])


def learn_once(name: str, backbone_name: str, task, cache: DiskFeatureCache | None) -> tuple[int, int]:
    """Feature-extraction forwards and cache hits of one fresh learning of ``task`` from seed 0 (two epochs,
    OVOR's second a VOR one): a new backbone and method each time, so nothing is shared but the cache."""
    overrides = {"train": {"epochs": 2, "batch_size": 8}, **({"vor_epochs": 1} if name == "ovor" else {})}
    seed_everything(0)
    backbone = common.backbone(backbone_name)
    counter = ImageCounter(backbone)
    method = create_method(name, backbone, overrides=overrides)
    engine = common.engine(feature_cache=cache)
    method.learn(task, engine)
    return counter.images, engine.cache_hits


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-cache", action="store_true", help="learn without the feature cache (the old count)")
    args = parser.parse_args(argv)
    common.setup(args)
    image_size = common.backbone(args.backbone).image_size
    (task,) = common.synthetic_tasks(1, 4, args.images, image_size)
    # the synthetic images stand for one ingested data version: give them a content key as strata.flows.learn does
    task = dataclasses.replace(task, data_key=f"synthetic-{args.images}-{image_size}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="strata-feature-cache-") as folder:
        for name in args.methods:
            cache = None if args.no_cache else DiskFeatureCache(Path(folder) / name)
            first, _ = learn_once(name, args.backbone, task, cache)
            second, hits = learn_once(name, args.backbone, task, cache)
            results[name] = {
                "reusable": METHODS[name],
                "first_run_forwards": first,
                "second_run_forwards": second,
                "second_run_cache_hits": hits,
                "target_second_run": 0,
                "met": second == 0,
                "vs_baseline": common.ratio(second, len(task.train)) or 0.0,
            }
    cache_what = None if args.no_cache else "strata.tasks.training.feature_cache.DiskFeatureCache (temporary folder)"
    document = {
        "benchmark": "feature_reuse",
        "machine": common.machine(),
        "config": {"backbone": args.backbone, "images": len(task.train), "cache": cache_what},
        "baseline": {"what": "one backbone forward per training image", "forwards": len(task.train)},
        "methods": results,
    }
    common.emit(document)
    return document


if __name__ == "__main__":
    main()
