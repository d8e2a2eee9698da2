"""Times the official zhoudw-zdw/RevisitingCIL steps of SimpleCIL and APER (task 0, and task t).

Everything that computes is the official code: the ``Learner`` of ``models/<method>.py`` configured by its
``exps/*cifar224_5_5*.json`` (SGD, momentum 0.9, cosine schedule, its learning rate and weight decay,
adapter bottleneck 64 or 16, VPT prompt tokens), ``update_fc`` and ``_train``: for APER at task 0 the
first-session adaptation (``_init_train``: forward, loss, backward, step), the dual-branch merge and
``replace_fc`` (class means through both branches); for SimpleCIL, and for APER at task t, ``replace_fc``
alone. Task 0 of SimpleCIL and task t are training-free: their figure is the prototype-extraction rate, as
in Strata's benchmark. Only ``utils.inc_net.get_convnet`` is replaced: it downloads ImageNet weights into
ViT-B-only factories, so the same official classes (``convs.vision_transformer_adapter``,
``convs.vision_transformer_ssf``, ``convs.vpt.VPT_ViT``, timm's ViT) are built here with random weights at the
benchmark's shape and the official trainable set (the adapters; SSF's and VPT's own freezing). The per-epoch
test-set accuracy inside ``_init_train`` is not part of the step and is skipped.

Run by :mod:`benchmarks.official` with timm 0.6.12 and easydict in front of ``sys.path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types
from functools import partial

import numpy as np
import official_runtime as runtime
import torch
from torch import nn

EXPERIMENTS = {  # method → (learner module, official experiment file)
    "simplecil": ("simplecil", "simplecil/cifar224_5_5_vit-b_simplecil.json"),
    "aper_adapter": ("aper_adapter", "aper_adapter/cifar224_5_5_vit-b_adapter.json"),
    "aper_ssf": ("aper_ssf", "aper_ssf/cifar224_5_5_vit-b_ssf.json"),
    "aper_vpt_shallow": ("aper_vpt", "aper_vpt-shallow/cifar224_5_5_vit-b_vpt-shallow.json"),
    "aper_vpt_deep": ("aper_vpt", "aper_vpt-deep/cifar224_5_5_vit-b_vpt-deep.json"),
    "aper_finetune": ("aper_finetune", "aper_finetune/cifar224_5_5_vit-b_finetune.json"),
}


def random_backbones(shape: dict):
    """``get_convnet`` for the ViT kinds of the experiments, with random weights at ``shape``."""
    import timm
    from convs import vision_transformer_adapter, vision_transformer_ssf, vpt
    from easydict import EasyDict

    def get_convnet(args, pretrained=False):
        name = args["convnet_type"].lower()
        if "_ssf" in name:
            model = vision_transformer_ssf.VisionTransformer(num_classes=0, **shape)
        elif "_vpt" in name:
            model = vpt.VPT_ViT(
                Prompt_Token_num=args["prompt_token_num"],
                VPT_type="Shallow" if args["vpt_type"] == "shallow" else "Deep",
                **shape,
            )
            model.head = nn.Identity()
            model.Freeze()
            model.load_prompt(model.obtain_prompt())
        elif "_adapter" in name:
            tuning = EasyDict(
                ffn_adapt=True,
                ffn_option="parallel",
                ffn_adapter_layernorm_option="none",
                ffn_adapter_init_option="lora",
                ffn_adapter_scalar="0.1",
                ffn_num=args["ffn_num"],
                d_model=shape["embed_dim"],
                vpt_on=False,
                vpt_num=0,
            )
            model = vision_transformer_adapter.VisionTransformer(
                num_classes=0,
                global_pool=False,
                drop_path_rate=0.0,
                tuning_config=tuning,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                **shape,
            )
            for parameter_name, parameter in model.named_parameters():  # officially: what the checkpoint lacks
                parameter.requires_grad = "adaptmlp" in parameter_name
        elif name in ("pretrained_vit_b16_224_in21k", "vit_base_patch16_224_in21k"):
            model = timm.models.vision_transformer.VisionTransformer(num_classes=0, **shape)
        else:
            raise NotImplementedError(f"the benchmark does not build {name}")
        model.out_dim = shape["embed_dim"]
        return model.eval()

    return get_convnet


class TimedLoader:
    """Batches in the official ``(index, image, label)`` form; records the wall time of each full pass."""

    def __init__(self, batches):
        self.batches = [(torch.arange(len(labels)), images, labels) for images, labels in batches]
        self.seconds: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        started = time.perf_counter()
        yield from self.batches
        self.seconds.append(time.perf_counter() - started)


def main() -> None:
    args = runtime.parser(__doc__.splitlines()[0], sorted(EXPERIMENTS)).parse_args()
    runtime.setup(args)
    # timm 0.6.12's maxxvit module has a dataclass default that Python 3.11 rejects; nothing here uses it
    sys.modules["timm.models.maxxvit"] = types.ModuleType("timm.models.maxxvit")
    import timm

    assert timm.__version__ == "0.6.12", f"the overlay is not in front of sys.path: timm {timm.__version__}"
    import utils.inc_net as inc_net

    shape = runtime.CONFIGS[args.backbone]
    module_name, experiment = EXPERIMENTS[args.method]
    with open(os.path.join(args.checkout, "exps", experiment)) as file:
        options = json.load(file)
    classes = args.classes_per_task
    options.update(
        device=[torch.device("cpu")],
        init_cls=classes,
        increment=classes,
        batch_size=args.batch_size,
        tuned_epoch=args.epochs,
    )  # the adaptation's epochs (and its cosine period)
    inc_net.get_convnet = random_backbones(shape)
    learner_module = __import__(f"models.{module_name}", fromlist=["Learner"])
    generator = torch.Generator().manual_seed(0)

    def rate(seconds: list[float]) -> dict:
        rates = [args.steps * args.batch_size / s for s in seconds]
        return {"images_per_s": round(float(np.median(rates)), 2), "per_epoch": [round(r, 2) for r in rates]}

    def prototypes(task: int) -> dict:
        loader = TimedLoader(runtime.batches(args, task, generator))
        for _ in range(args.epochs):
            learner._train(None, None, loader)
        return {"kind": "prototypes", **rate(loader.seconds)}

    with contextlib.redirect_stdout(sys.stderr):  # the official code prints; stdout carries the JSON only
        torch.manual_seed(0)
        learner = learner_module.Learner(options)
        learner._compute_accuracy = lambda *_: 0.0
        figures = {}
        for task, key in ((0, "task_0"), (1, "task_t")):  # incremental_train minus its DataLoaders
            learner._cur_task, learner._total_classes = task, (task + 1) * classes
            learner._network.update_fc(learner._total_classes)
            learner.train_dataset = types.SimpleNamespace(labels=np.arange(task * classes, (task + 1) * classes))
            if task == 0 and args.method != "simplecil":
                train = TimedLoader(runtime.batches(args, task, generator))
                learner._train(train, None, TimedLoader(runtime.batches(args, task, generator)))
                figures[key] = {"kind": "train", **rate(train.seconds)}
            else:
                figures[key] = prototypes(task)
            learner.after_task()
    runtime.emit("zhoudw-zdw/RevisitingCIL", args, method=args.method, **figures)


if __name__ == "__main__":
    main()
