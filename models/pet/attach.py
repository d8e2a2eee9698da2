"""The PET contract, and attaching PET modules to a timm ViT without copying its blocks.

Every PET (LAE's per-block adapters, LoRA and prefixes, APER's AdaptFormer, SSF, VPT and tuned copy, OVOR's
OnePrompt) implements :class:`PET`: one ``attach(backbone, attachment)`` that records each hook or swap it
makes in an :class:`Attachment`, so ``attachment.detach()`` undoes all of it. Detaching is therefore the same
for every PET and cannot be forgotten by one.

PETs are owned by the method (so they are part of its state, not the backbone's); the backbone only
receives forward hooks, or — for prefix attention, which changes attention internals — a wrapper that
re-registers the *same* timm submodules under the same names. Either way the backbone's state-dict keys
never change, and detaching restores it exactly. Methods attach their PETs only for the duration of a
forward pass (:func:`attached`), so one backbone can serve several PET sets (LAE's online and offline
experts, APER's PTM and adapted branches) and several methods in turn without one's PETs leaking into
another's features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from strata.models.backbones import Backbone


class Attachment:
    """The undo list of one PET set on one backbone."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def forward_hook(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, args, output) -> new output`` after ``module`` runs."""
        self._undo.append(module.register_forward_hook(hook).remove)

    def forward_pre_hook(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, args) -> new args`` before ``module`` runs."""
        self._undo.append(module.register_forward_pre_hook(hook).remove)

    def add_output(self, module: nn.Module, branch: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make ``module(x)`` return ``module(x) + branch(x)``: a PET parallel to ``module``."""
        self.forward_hook(module, lambda _m, args, output: output + branch(args[0]))

    def swap(self, parent: nn.Module, name: str, replacement: nn.Module) -> None:
        """Replace ``parent.<name>``; detaching puts the original back."""
        original = getattr(parent, name)
        setattr(parent, name, replacement)
        self._undo.append(lambda: setattr(parent, name, original))

    @property
    def attached(self) -> bool:
        return bool(self._undo)

    def detach(self) -> None:
        while self._undo:
            self._undo.pop()()


@runtime_checkable
class PET(Protocol):
    """A parameter-efficient tuning module: joins a backbone only through an :class:`Attachment`."""

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        """Hook into or swap parts of ``backbone``, recording every change in ``attachment``."""
        ...


class PETList(nn.ModuleList):
    """PETs that join a backbone together, e.g. one per adapted block; itself a :class:`PET`.

    Being a ``ModuleList``, its state keys are its members' under their positions (``0.…``, ``1.…``).
    """

    def attach(self, backbone: Backbone, attachment: Attachment) -> None:
        for pet in self:
            cast(PET, pet).attach(backbone, attachment)


def attach_pets(backbone: Backbone, *pets: PET) -> Attachment:
    """Attach ``pets`` to ``backbone`` until the returned attachment is detached (all or nothing)."""
    attachment = Attachment()
    try:
        for pet in pets:
            pet.attach(backbone, attachment)
    except BaseException:
        attachment.detach()
        raise
    return attachment


@contextmanager
def attached(backbone: Backbone, *pets: PET) -> Iterator[Attachment]:
    """``pets`` attached to ``backbone`` for the duration of a ``with`` block, detached afterwards."""
    attachment = attach_pets(backbone, *pets)
    try:
        yield attachment
    finally:
        attachment.detach()


def adapted_blocks(depth: int, wanted: list[int]) -> list[int]:
    """The requested block indices that exist in a ViT of ``depth`` blocks (clipped for tiny ViTs)."""
    return [b for b in wanted if 0 <= b < depth]
