"""Frozen-feature reuse: backbone forwards counted when the same increment is learned a second time.

SimpleCIL and APER embed the task's training images for their prototypes, OVOR embeds them for its VOR
epochs; all of these are frozen-backbone features that a content-keyed cache could serve on a second
run of the same increment (target: zero forwards). Strata has no such cache yet, so the count is the
honest one. Forwards are counted as images entering ``patch_embed``; the baseline of the same run is
one forward per training image.

    python -m benchmarks.feature_reuse
"""

from __future__ import annotations

import torch

from benchmarks import common
from models.methods import create_method

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


def learn_once(name: str, backbone, task, counter: ImageCounter) -> int:
    """Feature-extraction forwards of one fresh learning of ``task`` (two epochs, OVOR's second a VOR one)."""
    overrides = {"train": {"epochs": 2, "batch_size": 8}, **({"vor_epochs": 1} if name == "ovor" else {})}
    method = create_method(name, backbone, overrides=overrides)
    counter.images = 0
    method.learn(task, common.engine())
    return counter.images


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    common.setup(args)
    backbone = common.backbone(args.backbone)
    (task,) = common.synthetic_tasks(1, 4, args.images, backbone.image_size)
    counter = ImageCounter(backbone)
    results = {}
    for name in args.methods:
        what = METHODS[name]
        torch.manual_seed(0)
        first = learn_once(name, backbone, task, counter)
        second = learn_once(name, backbone, task, counter)
        results[name] = {"reusable": what, "first_run_forwards": first, "second_run_forwards": second,
                         "target_second_run": 0, "met": second == 0,
                         "vs_baseline": common.ratio(second, len(task.train))}
    document = {"benchmark": "feature_reuse", "machine": common.machine(),
                "config": {"backbone": args.backbone, "images": len(task.train), "cache": None},
                "baseline": {"what": "one backbone forward per training image", "forwards": len(task.train)},
                "methods": results}
    common.emit(document)
    return document


if __name__ == "__main__":
    main()
