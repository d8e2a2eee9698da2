"""Benchmark reports on disk: metrics.json and the two plots people look at."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METRICS_FILE = "metrics.json"
CURVE_FILE = "accuracy_curve.png"
MATRIX_FILE = "accuracy_matrix.png"


def write_metrics(out: Path, metrics: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2))
    return path


def plot_accuracy_curve(out: Path, curves: dict[str, list[float]], title: str) -> Path:
    """A_t (and any other per-task series) against the task index, in percent."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), [100 * v for v in values], marker="o", label=label)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / CURVE_FILE
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_matrix(out: Path, matrix: list[list[float | None]], title: str) -> Path:
    """Heatmap of R[t, j] with the value in each learned cell."""
    values = np.array([[np.nan if v is None else 100 * v for v in row] for row in matrix])
    size = len(values)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * size, 0.8 + 0.6 * size))
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for t in range(size):
        for j in range(t + 1):
            ax.text(
                j,
                t,
                f"{values[t, j]:.0f}",
                ha="center",
                va="center",
                color="white" if values[t, j] < 60 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(size), [str(j + 1) for j in range(size)])
    ax.set_yticks(range(size), [str(t + 1) for t in range(size)])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after learning task t")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    path = out / MATRIX_FILE
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, metrics: dict, title: str) -> dict[str, Path]:
    """metrics.json + accuracy_curve.png + accuracy_matrix.png in ``out``."""
    return {
        "metrics": write_metrics(out, metrics),
        "curve": plot_accuracy_curve(
            out, {"A_t": metrics["accuracy"], "task-averaged": metrics["task_averaged_accuracy"]}, title
        ),
        "matrix": plot_accuracy_matrix(out, metrics["accuracy_matrix"], title),
    }
