"""The interface every class-incremental method implements.

A method is an ``nn.Module`` around a frozen :class:`~strata.models.backbones.Backbone`:

* ``begin_task(task)`` grows the structure for the task's new classes (heads, LAE's offline PET…);
  the structural part lives in ``prepare_task(index, num_new)`` so a saved state can be replayed;
* ``fit_task(task, engine)`` learns the task (through the shared :class:`~strata.models.engine.Engine`);
* ``forward(pixels)`` is the inference rule: logits over all classes seen so far;
* ``save_state``/``load_state`` write and read its own state (safetensors + JSON) without the
  backbone weights, refusing a state made for another method, variant or backbone;
* ``export_module()`` gives the pure inference ``nn.Module`` that ONNX export traces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from strata.models.backbones import Backbone, weights_fingerprint
from strata.models.engine import Engine, TrainConfig, TrainingHooks
from strata.models.errors import UserError
from strata.models.images import DECODER
from strata.models.streams import Task
from strata.models.transforms import TransformConfig, test_transform, train_transform

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
STATE_FORMAT = 1


class StateError(UserError, ValueError):
    """A saved state does not belong to this method, variant or backbone."""


class MethodConfig(BaseModel):
    """Settings shared by all methods; subclasses set the spec's defaults."""

    model_config = ConfigDict(extra="forbid")

    transforms: TransformConfig = TransformConfig()
    train: TrainConfig = TrainConfig()
    eval_batch_size: int = 128


ConfigT = TypeVar("ConfigT", bound=MethodConfig)


class Method(nn.Module, TrainingHooks, Generic[ConfigT]):
    """Base class: bookkeeping of tasks and classes, state files, transforms.

    Generic in its config class so that each method reads its own settings (``Aper(Method[AperConfig])``
    sees ``self.config.pet``) with their types."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # forward() already returns probabilities (LAE's max of softmaxes): consumers must not softmax again
    outputs_probabilities: ClassVar[bool] = False

    def __init__(self, name: str, config: ConfigT, backbone: Backbone):
        super().__init__()
        self.name = name
        self.config = config
        self.backbone = backbone
        self.task_sizes: list[int] = []
        self.class_names: list[str] = []

    # -- tasks -----------------------------------------------------------------------------------
    @property
    def num_seen(self) -> int:
        return sum(self.task_sizes)

    @property
    def num_old(self) -> int:
        """Classes seen before the current task: where its classes start among the logits."""
        return sum(self.task_sizes[:-1])

    @property
    def task_index(self) -> int:
        """Index of the current (last begun) task; −1 before the first."""
        return len(self.task_sizes) - 1

    @property
    def trains_backbone(self) -> bool:
        """True when the backbone's own weights change (they are then part of the state)."""
        return False

    def begin_task(self, task: Task) -> None:
        if task.index != len(self.task_sizes):
            raise ValueError(f"{self.name} expected task {len(self.task_sizes)} next, got task {task.index}")
        if task.num_old != self.num_seen:
            raise ValueError(f"task {task.index} starts at class {task.num_old}, but {self.num_seen} are seen")
        self.task_sizes.append(task.num_new)
        self.class_names.extend(task.class_names)
        self.prepare_task(task.index, task.num_new)
        self.to(self.device)

    def prepare_task(self, index: int, num_new: int) -> None:
        """Grow the structure for a task's new classes; must depend only on (index, num_new)."""
        raise NotImplementedError

    def fit_task(self, task: Task, engine: Engine) -> list[float]:
        """Learn one task; returns the mean training loss per epoch (empty if it does not train).

        By default: the shared loop over the task's training images (train transform) with this method's
        hooks and ``config.train``; methods that learn otherwise (prototypes, phases) override it."""
        return engine.fit(self, task.train.with_transform(self.train_transform()), self.config.train, task.index)

    def learn(self, task: Task, engine: Engine) -> list[float]:
        """``begin_task`` then ``fit_task``: one increment."""
        self.to(engine.device)
        self.begin_task(task)
        return self.fit_task(task, engine)

    # -- inference ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits over all seen classes (the method's inference rule)."""
        raise NotImplementedError

    def export_module(self) -> nn.Module:
        """The pure inference module: pixels in [0, 1] → logits over seen classes."""
        return self.eval()

    def train_transform(self):
        return train_transform(self.config.transforms, self.backbone.image_size)

    # -- feature cache ---------------------------------------------------------------------------------
    def feature_identity(self) -> str:
        """What, besides the data and the transform, decides the features a method extracts: by default
        the frozen backbone (name, a digest of its current weights and of its module structure). Methods
        whose feature function also depends on learned tensors (APER's PET, OVOR's prompts) add a digest
        of those tensors."""
        if self.trains_backbone:
            raise ValueError(f"{self.name} trains its backbone: its features are not frozen and cannot be cached")
        # The weights as they are now (not only as built) and the module structure, which shows wrappers
        # attached to the blocks (prefix attention); hashing ViT-B takes a fraction of a second per task.
        structure = hashlib.sha256(repr(self.backbone).encode()).hexdigest()[:16]
        return f"{self.backbone.info.name}:{weights_fingerprint(self.backbone)}:{structure}"

    def feature_cache_key(self, task: Task, transform, split: str) -> str | None:
        """The content key of ``task``'s ``split`` samples embedded by this method under ``transform``, or
        None (no caching) when the task's data have no content identity. Never keyed by object identity:
        data md5, class ids (the cached labels are learning-order ids), feature identity, transform, decoder."""
        if not task.data_key:
            return None
        parts = [
            task.data_key,
            split,
            ",".join(map(str, task.class_ids)),
            self.feature_identity(),
            repr(transform),
            self.config.transforms.model_dump_json(),
            str(self.backbone.image_size),
            DECODER,
        ]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def test_transform(self):
        return test_transform(self.config.transforms, self.backbone.image_size)

    # -- state -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learned; the frozen backbone's weights are excluded unless they were trained."""
        state = self.state_dict()
        if not self.trains_backbone:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def state_meta(self) -> dict[str, Any]:
        info = self.backbone.info
        return {
            "format": STATE_FORMAT,
            "method": self.name,
            "config": self.config.model_dump(mode="json"),
            "backbone": {
                "name": info.name,
                "source": info.source,
                "embed_dim": info.embed_dim,
                "depth": info.depth,
                "fingerprint": info.fingerprint,
            },
            "task_sizes": self.task_sizes,
            "class_names": self.class_names,
        }

    def save_state(self, directory: str | Path) -> Path:
        """Write ``state.safetensors`` + ``state.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = _dedupe_shared(self.state_tensors())
        save_file(tensors, str(directory / STATE_TENSORS))
        (directory / STATE_META).write_text(json.dumps(self.state_meta(), indent=2))
        return directory

    def load_state(self, directory: str | Path) -> None:
        """Restore a state written by ``save_state`` onto a freshly built method of the same kind.

        Both files are read, and the state's method, config and backbone checked, before the method grows: a
        foreign or damaged state is refused with the method as it was."""
        directory = Path(directory)
        meta = read_state_meta(directory)
        try:
            self.check_compatible(meta)
        except StateError as exc:
            raise StateError(f"cannot load the state in {directory}: {exc}") from exc
        if self.task_sizes:
            raise StateError(f"load_state needs a fresh {self.name}; this one has already seen tasks")
        tensors = _read_state_tensors(directory / STATE_TENSORS)
        for index, size in enumerate(meta["task_sizes"]):
            self.task_sizes.append(size)
            self.prepare_task(index, size)
        self.class_names = list(meta["class_names"])
        own = self.state_tensors()
        if set(tensors) != set(own):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise StateError(
                f"state in {directory} does not match {self.name}: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        self.load_state_dict(tensors, strict=False)

    def check_compatible(self, meta: dict[str, Any]) -> None:
        if meta.get("method") != self.name:
            raise StateError(
                f"state was saved by method {meta.get('method')!r}, not {self.name!r}; build a "
                f"{meta.get('method')!r} method to load it"
            )
        saved_config = self.config_class.model_validate(meta["config"])
        if saved_config != self.config:
            raise StateError(
                f"state was saved with another {self.name} configuration: "
                f"{saved_config.model_dump()} vs {self.config.model_dump()}"
            )
        saved, info = meta["backbone"], self.backbone.info
        if (saved["name"], saved["fingerprint"]) != (info.name, info.fingerprint):
            raise StateError(
                f"state was saved on backbone {saved['name']} (weights {saved['fingerprint']}), "
                f"but this method runs on {info.name} (weights {info.fingerprint}); load the same weights"
            )


def read_state_meta(directory: str | Path) -> dict[str, Any]:
    """Read and check the JSON half of a saved state."""
    directory = Path(directory)
    for name in (STATE_TENSORS, STATE_META):
        if not (directory / name).is_file():
            raise StateError(f"{directory} holds no Strata method state: {name} is missing")
    try:
        meta = json.loads((directory / STATE_META).read_text())
    except json.JSONDecodeError as exc:
        raise StateError(f"{directory / STATE_META} is not valid JSON: {exc}") from exc
    if meta.get("format") != STATE_FORMAT:
        raise StateError(f"{directory} has state format {meta.get('format')}, expected {STATE_FORMAT}")
    return meta


def _read_state_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensor half of a saved state; safetensors never unpickles, so a swapped-in pickle only fails to parse."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise StateError(
            f"{path} is not a safetensors file ({exc}): it is damaged or was not written by save_state; "
            f"restore the state folder from a saved copy (a registered version keeps one)"
        ) from exc


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each entry its own storage."""
    seen: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return result
