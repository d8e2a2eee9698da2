"""Class-incremental evaluation of a method on the test sets of the tasks it has seen."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from strata.models.engine import Engine
from strata.models.methods.base import Method
from strata.models.streams import Task


@dataclass(frozen=True)
class Evaluation:
    """Accuracy on each seen task's test set (one row of R) plus every label and prediction."""

    accuracies: list[float]
    labels: np.ndarray
    predictions: np.ndarray


def evaluate(method: Method, tasks: Sequence[Task], engine: Engine) -> Evaluation:
    """Argmax over all seen classes (no task id), each test image seen once, in batches."""
    transform = method.test_transform()
    accuracies, all_labels, all_predictions = [], [], []
    method.eval()
    for task in tasks:
        logits, targets = engine.extract(method, task.test.with_transform(transform), method.config.eval_batch_size)
        predictions = logits.argmax(dim=1).numpy()
        labels = targets.numpy()
        accuracies.append(float((predictions == labels).mean()))
        all_labels.append(labels)
        all_predictions.append(predictions)
    return Evaluation(accuracies, np.concatenate(all_labels), np.concatenate(all_predictions))
