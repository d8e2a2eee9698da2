"""Attaching PET modules to a timm ViT without copying its blocks, and detaching them again.

PETs are owned by the method (so they are part of its state, not the backbone's); the backbone only
receives forward hooks, or — for prefix attention, which changes attention internals — a wrapper
that re-registers the *same* timm submodules under the same names. Either way the backbone's
state-dict keys never change, and ``Attachment.detach()`` restores it exactly, so one backbone can
serve several PET sets (LAE's online and offline experts, APER's PTM and adapted branches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


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


def adapted_blocks(depth: int, wanted: list[int]) -> list[int]:
    """The requested block indices that exist in a ViT of ``depth`` blocks (clipped for tiny ViTs)."""
    return [b for b in wanted if 0 <= b < depth]


@contextmanager
def attached(attach: Callable[[Attachment], None]) -> Iterator[Attachment]:
    """Run ``attach(attachment)`` for the duration of a ``with`` block, detaching afterwards."""
    attachment = Attachment()
    try:
        attach(attachment)
        yield attachment
    finally:
        attachment.detach()
