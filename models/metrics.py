"""Class-incremental evaluation from the accuracy matrix.

``R[t, j]`` is the accuracy after learning task t on task j's test set, over all classes seen so
far (class-incremental: no task id at test time); entries with j > t are NaN. Every figure below is
derived from R and the test-set sizes, so a run's metrics can be recomputed from metrics.json.
"""

from __future__ import annotations

import numpy as np


def accuracy_matrix(rows: list[list[float]]) -> np.ndarray:
    """Square matrix from the per-task rows (row t has t+1 entries); NaN above the diagonal."""
    size = len(rows)
    matrix = np.full((size, size), np.nan)
    for t, row in enumerate(rows):
        if len(row) != t + 1:
            raise ValueError(f"row {t} of the accuracy matrix has {len(row)} entries, expected {t + 1}")
        matrix[t, : t + 1] = row
    return matrix


def _weighted(R: np.ndarray, sizes: np.ndarray, t: int, tasks: slice) -> float:
    weights = sizes[tasks].astype(float)
    return float(np.dot(R[t, tasks], weights) / weights.sum()) if weights.sum() else float("nan")


def average_accuracy(R: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """A_t: accuracy over all test samples of the seen classes (sample-weighted), per task t."""
    return np.array([_weighted(R, sizes, t, slice(0, t + 1)) for t in range(len(R))])


def task_averaged_accuracy(R: np.ndarray) -> np.ndarray:
    """The CODA-P/OVOR convention: unweighted mean of R[t, :t+1]."""
    return np.array([float(np.mean(R[t, : t + 1])) for t in range(len(R))])


def average_incremental_accuracy(R: np.ndarray, sizes: np.ndarray) -> float:
    """Ā: mean of A_t over all tasks."""
    return float(np.mean(average_accuracy(R, sizes)))


def forgetting(R: np.ndarray) -> np.ndarray:
    """F_t: mean over old tasks j < t of (best earlier accuracy on j) − (accuracy on j now).

    F_0 is 0 by definition (nothing to forget yet).
    """
    values = [0.0]
    for t in range(1, len(R)):
        drops = [np.max(R[j:t, j]) - R[t, j] for j in range(t)]
        values.append(float(np.mean(drops)))
    return np.array(values)


def backward_transfer(R: np.ndarray) -> np.ndarray:
    """BWT_t: mean over j < t of R[t, j] − R[j, j] (negative means forgetting); BWT_0 = 0."""
    return np.array([0.0] + [float(np.mean([R[t, j] - R[j, j] for j in range(t)])) for t in range(1, len(R))])


def old_new_accuracy(R: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample-weighted accuracy on the classes of earlier tasks (NaN at t=0) and on task t's."""
    old = np.array([_weighted(R, sizes, t, slice(0, t)) if t else float("nan") for t in range(len(R))])
    new = np.array([R[t, t] for t in range(len(R))])
    return old, new


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j] = test samples of class i predicted as class j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)), 1)
    return counts


def summarize(R: np.ndarray, sizes: np.ndarray) -> dict:
    """Every figure of the protocol, as plain lists/floats ready for JSON."""
    sizes = np.asarray(sizes)
    A = average_accuracy(R, sizes)
    old, new = old_new_accuracy(R, sizes)
    return {
        "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in R],
        "test_sizes": sizes.tolist(),
        "accuracy": A.tolist(),
        "average_incremental_accuracy": float(np.mean(A)),
        "task_averaged_accuracy": task_averaged_accuracy(R).tolist(),
        "forgetting": forgetting(R).tolist(),
        "backward_transfer": backward_transfer(R).tolist(),
        "old_accuracy": [None if np.isnan(v) else float(v) for v in old],
        "new_accuracy": new.tolist(),
        "final_accuracy": float(A[-1]),
        "final_forgetting": float(forgetting(R)[-1]),
    }
