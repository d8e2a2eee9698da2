"""Times the official jpmorganchase/ovor training step of OnePrompt (task 0, and task t with old classes masked).

Everything that computes is the official code: ``run.get_args`` defaults (``configs/cifar-100_prompt.yaml``:
Adam, lr 1e-3, cosine schedule, prompt lengths 10/40), the ``learners.prompt.OnePrompt`` learner with its
``init_optimizer`` and ``NormalNN._train_one_epoch`` (prompted forward, logits past the task masked, cross
entropy plus prompt loss, backward, step). Only the model factory is replaced: ``zoo.vit_pt_imnet``
downloads ImageNet weights into a fixed ViT-B, so the same official modules (``ViTZoo`` with
``models.vit.VisionTransformer``, a linear head and ``zoo.OnePrompt``) are assembled here with random
weights at the benchmark's shape; prompt layers past the ViT's depth are dropped (the tiny ViT has 4 blocks,
OnePrompt's e-prompts sit at 2-4). The virtual-outlier epochs are not timed (Strata's benchmark leaves
them out too).

Run by :mod:`benchmarks.official` with timm 0.4.12 and faiss-cpu (``learners.ood`` imports faiss at module
level; the official pin, faiss-gpu 1.7.2, has no CPU or Python 3.11 wheel) in front of ``sys.path``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import official_runtime as runtime
import torch
from torch import nn


def main() -> None:
    args = runtime.parser(__doc__.splitlines()[0], ["ovor"]).parse_args()
    runtime.setup(args)
    import timm

    assert timm.__version__ == "0.4.12", f"the overlay is not in front of sys.path: timm {timm.__version__}"
    os.chdir(args.checkout)  # run.get_args reads configs/ relative to the working directory
    sys.argv = ["run.py", "--config", "configs/cifar-100_prompt.yaml", "--gpus", "0"]
    import learners  # noqa: I001 (the checkout's packages, not Strata's `models`)
    import run
    from models import zoo
    from models.vit import VisionTransformer
    from utils.logger import Logger

    shape = runtime.CONFIGS[args.backbone]
    width = shape["embed_dim"]
    vit_options = (
        dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, ckpt_layer=0, drop_path_rate=0)
        if width == 768
        else shape
    )  # ViT-B: what ViTZoo builds

    def random_vit_zoo(out_dim, block_division=None, prompt_flag="None", prompt_param=None):
        """``ViTZoo``'s modules without its weight download, at the benchmark's shape."""
        model = zoo.ViTZoo.__new__(zoo.ViTZoo)
        nn.Module.__init__(model)
        model.prompt_flag = prompt_flag
        model.feat = VisionTransformer(**vit_options)
        model.last = nn.Linear(width, out_dim)
        model.prompt = zoo.OnePrompt(width, prompt_param[0], prompt_param[1])
        for kind in ("g", "e"):
            layers = getattr(model.prompt, f"{kind}_layers")
            for layer in (layer for layer in layers if layer >= shape["depth"]):
                delattr(model.prompt, f"{kind}_p_{layer}")
            setattr(model.prompt, f"{kind}_layers", [layer for layer in layers if layer < shape["depth"]])
        return model

    zoo.vit_pt_imnet = random_vit_zoo
    options = run.get_args()
    options.batch_size, options.split_size = args.batch_size, args.classes_per_task
    figures = {}
    with tempfile.TemporaryDirectory(prefix="ovor-benchmark-") as log_dir:
        options.logging.log_dir = log_dir  # the official logger writes here, not into the checkout
        torch.manual_seed(0)
        learner = learners.prompt.OnePrompt(
            options.tasks * args.classes_per_task, options, Logger(options.logging, seed=1)
        )
        generator = torch.Generator().manual_seed(0)
        for task, key in ((0, "task_0"), (1, "task_t")):  # Trainer.run + NormalNN.train, minus evaluation
            learner.subset_start, learner.subset_end = task * args.classes_per_task, (task + 1) * args.classes_per_task
            if task > 0:
                learner.model.module.prompt.process_task_count()
            learner.init_optimizer()
            learner.model.train()
            batches = [
                (images, labels, torch.arange(len(labels))) for images, labels in runtime.batches(args, task, generator)
            ]
            figures[key] = {
                "kind": "train",
                **runtime.timed_epochs(lambda epoch, batches=batches: learner._train_one_epoch(batches, epoch), args),
            }
    runtime.emit(
        "jpmorganchase/ovor", args, method="ovor", learnable_parameters=learner.count_learnable_params(), **figures
    )


if __name__ == "__main__":
    main()
