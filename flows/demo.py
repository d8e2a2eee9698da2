"""``strata demo``: the whole platform on scikit-learn's digits, offline, in a few minutes.

A fresh workspace; the digits split into 5 batches of 2 classes as a data team would deliver them;
each batch ingested (validated, versioned with DVC, recorded) and learned by the ``learn`` flow
(tracked in MLflow, registered, gated). The backbone is the random-init ``tiny`` ViT, and the output
says so: the run shows the platform working, not what a pretrained ViT would reach.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.learn import LearnParams, learn
from flows.manage import status
from tasks.demo_data import write_digit_batches
from tasks.ingest import ingest
from tasks.settings import load_settings
from tasks.workspace import init_workspace

LEARNER = "digits"


class DemoError(ValueError):
    """The demo cannot start as asked; the message says how to fix it."""


def run_demo(directory: Path | None = None, method: str = "simplecil",
             on_batch: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Ingest and learn 5 digit batches in a fresh workspace; returns the learner's status and timings."""
    directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="strata-demo-")) / "workspace"
    if directory.exists() and any(directory.iterdir()):
        raise DemoError(f"{directory} is not empty; the demo needs a fresh workspace: pass another --dir")
    started = time.perf_counter()
    init_workspace(directory)
    settings = load_settings(directory)
    with tempfile.TemporaryDirectory(prefix="strata-demo-incoming-") as incoming:
        batches = write_digit_batches(Path(incoming))
        for index, batch in enumerate(batches):
            if on_batch is not None:
                on_batch(index, len(batches), batch.name)
            ingest(settings, batch, LEARNER)
            learn(LearnParams(learner=LEARNER, method=method, backbone="tiny", workspace=str(directory),
                              show_progress=False))
    (summary,) = status(LEARNER, directory)
    return {"workspace": str(directory), "settings": settings, "status": summary,
            "seconds": time.perf_counter() - started}
