"""Times the official gqk/LAE training step (task 0, and task t with the EMA of the offline PET).

Everything that computes is the official code: ``main.MyModule`` built from the official
``config/vit_<pet>.yaml`` (Adam, lr 0.0028125, EMA decay 0.9999, 3 freeze epochs), its per-task
``setup`` (head, PETs, EMA copy, optimizer), ``pre_train_epoch`` (freeze schedule) and
``libml.core.module.Module.train_epoch`` (forward, loss on the new classes, backward, step, EMA update).
Replaced, because they are launch machinery and not the step: Lightning Fabric (by a single-process fp32
trainer with the methods ``Module`` calls), the data module (fixed synthetic batches) and the TensorBoard
logger. The backbone is the official ViT with random weights; PET blocks past the ViT's depth are dropped
(the tiny ViT has 4 blocks, the official default adapts 0-4).

Run by :mod:`benchmarks.official` with timm 0.5.4, torchmetrics 0.10.2, absl-py and torchinfo in front
of ``sys.path``; ``lightning`` and ``continuum`` are imported by ``libml`` at module level but not used
by the step, so they are served as inert modules rather than installed (Lightning 1.9 pulls an app stack).
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import importlib.metadata
import sys
import types
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import official_runtime as runtime
import torch

PET_CONFIG = {"lae_adapter": "vit_adapter", "lae_lora": "vit_lora", "lae_prefix": "vit_prefix"}
INERT_PACKAGES = ("lightning", "continuum", "torch.utils.tensorboard")


class _InertClass(type):
    """Any attribute is another inert class; iterating one yields nothing (``for name in REGISTRY``)."""

    def __getattr__(cls, name):
        return _InertClass(name, (), {})

    def __iter__(cls):
        return iter(())


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertClass(name, (), {})


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if any(name == root or name.startswith(root + ".") for root in INERT_PACKAGES):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _InertModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def install_shims() -> None:
    """What torch 2, Python 3.11 and a setuptools without ``pkg_resources`` change under the 2023 code."""
    resources = types.ModuleType("pkg_resources")  # torchmetrics 0.10 asks it for package versions
    resources.DistributionNotFound = importlib.metadata.PackageNotFoundError
    resources.get_distribution = lambda name: types.SimpleNamespace(version=importlib.metadata.version(name))
    sys.modules.setdefault("pkg_resources", resources)
    sys.meta_path.insert(0, _InertFinder())
    # Scaler.extra_repr formats a 0-d Parameter with ":.4f", which torch 2 refuses for Parameter subclasses.
    torch.nn.Parameter.__format__ = lambda self, spec: (
        format(self.detach().item(), spec) if self.dim() == 0 else torch.Tensor.__format__(self, spec)
    )


def import_official():
    """``main`` and ``libml``; their dataclasses use instances as defaults, which 3.11 accepts only if hashable."""
    original = dataclasses.dataclass

    def hashable_dataclass(cls=None, **kwargs):
        def wrap(klass):
            klass = original(klass, **kwargs)
            if klass.__hash__ is None:
                klass.__hash__ = object.__hash__
            return klass

        return wrap if cls is None else wrap(cls)

    dataclasses.dataclass = hashable_dataclass
    try:
        import main
        from libml.core.abc import DataModuleABC
        from libml.model import _BACKBONE
        from libml.model.backbone import vit
        from libml.utils.config import build_config
    finally:
        dataclasses.dataclass = original
    return main, DataModuleABC, _BACKBONE, vit, build_config


class PlainTrainer:
    """The Fabric methods ``Module`` calls, for one process in fp32."""

    global_rank, is_global_zero = 0, True
    setup = staticmethod(lambda model, *optimizers: (model, *optimizers))
    backward = staticmethod(lambda loss: loss.backward())
    autocast = staticmethod(nullcontext)
    no_backward_sync = staticmethod(lambda module, enabled: nullcontext())
    to_device = staticmethod(lambda batch: batch)
    setup_dataloaders = staticmethod(lambda loader: loader)


def main() -> None:
    args = runtime.parser(__doc__.splitlines()[0], sorted(PET_CONFIG)).parse_args()
    runtime.setup(args)
    install_shims()
    lae, DataModuleABC, backbones, vit, build_config = import_official()
    import timm

    assert timm.__version__ == "0.5.4", f"the overlay is not in front of sys.path: timm {timm.__version__}"

    class SyntheticTasks(DataModuleABC):
        """Stands in for libml's data module: fixed batches of ``classes_per_task`` classes per task."""

        def __init__(self, batches):
            self.current_task, self.start_task, self.num_tasks, self.memory = 0, 0, len(batches), None
            self.scenario_train = types.SimpleNamespace(
                increments=[args.classes_per_task] * len(batches), nb_tasks=len(batches)
            )
            self.batches = batches

        def train_dataloader(self, **_):
            return self.batches[self.current_task]

        def val_dataloader(self):
            return []

    torch.manual_seed(1)  # the official seed
    shape = runtime.CONFIGS[args.backbone]
    # a name starting with "vit" gets the official ViT head (class-token pooling)
    backbones["vit-strata-benchmark"] = (
        partial(vit.vit_b16_in21k, pretrained=False)
        if shape["embed_dim"] == 768
        else partial(vit._create_vision_transformer, "vit_b16_in21k", pretrained=False, **shape)
    )
    config, _ = build_config(
        root=Path(args.checkout) / "config", name=PET_CONFIG[args.method], argv=[], structure=lae.MyConf(), log_dir=None
    )
    module_config = config.module
    module_config.model.backbone = "vit-strata-benchmark"
    module_config.adapt_blocks = [block for block in module_config.adapt_blocks if block < shape["depth"]]
    module_config.num_epochs = args.epochs
    module_config.summary_depth = -1  # no torchinfo summary at each task's set-up

    generator = torch.Generator().manual_seed(0)
    batches = [
        [(images, labels, torch.full_like(labels, task)) for images, labels in runtime.batches(args, task, generator)]
        for task in (0, 1)
    ]
    data = SyntheticTasks(batches)
    module = lae.MyModule(module_config)
    module.datamodule, module.trainer, module.device = data, PlainTrainer(), torch.device("cpu")
    module.logger = types.SimpleNamespace(write_scalars=lambda *_, **__: None)

    figures = {}
    for task, key in ((0, "task_0"), (1, "task_t")):
        data.current_task = task
        module.setup()
        module.current_epoch, module.global_step = 0, 0
        module.train()

        def run_epoch(epoch, task=task):
            module.current_epoch = epoch
            module.pre_train_epoch()
            module.train_epoch(batches[task], len(batches[task]))

        # task t: the epochs after the freeze, where the online PET trains and the EMA runs every step
        figures[key] = {
            "kind": "train",
            **runtime.timed_epochs(run_epoch, args, first_epoch=0 if task == 0 else module_config.num_freeze_epochs),
        }
    runtime.emit("gqk/LAE", args, method=args.method, adapt_blocks=list(module_config.adapt_blocks), **figures)


if __name__ == "__main__":
    main()
