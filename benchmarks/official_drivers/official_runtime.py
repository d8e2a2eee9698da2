"""What the three official-code drivers share: options, CPU stand-ins for ``.cuda()``, data, timing, output.

A driver runs in its own interpreter with an overlay of the official code's pinned packages in front of
``sys.path`` (see :mod:`benchmarks.official`), so this module imports nothing but torch and the standard
library: Strata's own packages need timm 1.x, the official code an older timm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

# Strata's backbone names → the ViT each driver builds with random weights (no download).
CONFIGS = {
    "tiny": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0),
    "vit_base_patch16_224.augreg_in21k": dict(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0
    ),
}


def parser(description: str, methods: list[str]) -> argparse.ArgumentParser:
    """The options every driver takes; the launcher passes the values Strata's own run used."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--checkout", required=True, help="the official repository's checkout")
    result.add_argument("--method", choices=methods, default=methods[0], help="Strata's name of the method")
    result.add_argument("--backbone", choices=sorted(CONFIGS), default="tiny")
    result.add_argument("--batch-size", type=int, default=16)
    result.add_argument("--steps", type=int, default=2, help="optimizer steps per epoch")
    result.add_argument("--epochs", type=int, default=3, help="timed epochs per step (median reported)")
    result.add_argument("--classes-per-task", type=int, default=4)
    result.add_argument("--threads", type=int, default=None)
    return result


def setup(args: argparse.Namespace) -> None:
    """Threads, the checkout on ``sys.path``, no bytecode written into it, and CUDA calls made harmless."""
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.dont_write_bytecode = True
    sys.path.insert(0, args.checkout)
    if not torch.cuda.is_available():
        cuda_on_cpu()


def cuda_on_cpu() -> None:
    """The official code hard-codes CUDA; without a GPU its calls behave as they would on one, minus the move.

    ``Tensor.cuda()`` of a CPU tensor returns a copy, so a tensor that requires grad comes back as a non-leaf
    (code such as ``torch.zeros(1, requires_grad=True).cuda()`` followed by ``+=`` relies on that); modules
    and ``set_device`` are left as they are.
    """
    torch.Tensor.cuda = lambda self, *a, **k: self.clone() if self.requires_grad else self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None


def batches(args: argparse.Namespace, task: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``--steps`` batches of uniform pixels with labels cycling through the task's classes."""
    size, count = CONFIGS[args.backbone]["img_size"], args.classes_per_task
    labels = torch.arange(args.batch_size) % count + task * count
    return [
        (torch.rand(args.batch_size, 3, size, size, generator=generator), labels.clone()) for _ in range(args.steps)
    ]


def timed_epochs(run_epoch: Callable[[int], object], args: argparse.Namespace, first_epoch: int = 0) -> dict:
    """Images/s of each of ``--epochs`` calls of ``run_epoch(epoch)`` (``--steps`` batches each); median first."""
    rates = []
    for epoch in range(first_epoch, first_epoch + args.epochs):
        started = time.perf_counter()
        run_epoch(epoch)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - started))
    return {"images_per_s": round(statistics.median(rates), 2), "per_epoch": [round(r, 2) for r in rates]}


def emit(codebase: str, args: argparse.Namespace, **figures) -> None:
    """One JSON line on stdout: what ran, on which commit and packages, and the figures."""
    import timm

    commit = subprocess.run(["git", "-C", args.checkout, "rev-parse", "HEAD"], capture_output=True, text=True)
    print(
        json.dumps(
            {
                "codebase": codebase,
                "commit": commit.stdout.strip() or None,
                "timm": timm.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "backbone": args.backbone,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "epochs": args.epochs,
                **figures,
            }
        ),
        file=sys.__stdout__,
        flush=True,
    )
