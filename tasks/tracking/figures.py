"""The figures of a learner's increments, typed where the learn flow hands them from step to step.

``LearnerFigures`` is ``strata.models.metrics.summarize``'s output after the newest task (the whole
curve so far); ``IncrementFigures`` is its column at one task, what MLflow logs at that step;
``IncrementMetrics`` is what the ledger records for a succeeded increment and the next increments
read back (its R row, for the accuracy matrix, and its A_t, for the gate).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class IncrementFigures(BaseModel):
    """The protocol's figures at one task; ``old_accuracy`` is None at task 0 (no old classes yet)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_index: int
    accuracy: float
    task_averaged_accuracy: float
    forgetting: float
    backward_transfer: float
    old_accuracy: float | None
    new_accuracy: float
    average_incremental_accuracy: float

    def step_metrics(self) -> dict[str, float]:
        """The MLflow metrics of the task's step: every figure that has a value."""
        return {name: value for name, value in self.model_dump(exclude={"task_index"}).items() if value is not None}


class LearnerFigures(BaseModel):
    """Every figure of the protocol after the newest task, as ``summarize`` returns them (JSON-ready)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accuracy_matrix: list[list[float | None]]
    test_sizes: list[int]
    accuracy: list[float]
    average_incremental_accuracy: float
    task_averaged_accuracy: list[float]
    forgetting: list[float]
    backward_transfer: list[float]
    old_accuracy: list[float | None]
    new_accuracy: list[float]
    final_accuracy: float
    final_forgetting: float

    def at(self, task_index: int) -> IncrementFigures:
        return IncrementFigures(
            task_index=task_index,
            accuracy=self.accuracy[task_index],
            task_averaged_accuracy=self.task_averaged_accuracy[task_index],
            forgetting=self.forgetting[task_index],
            backward_transfer=self.backward_transfer[task_index],
            old_accuracy=self.old_accuracy[task_index],
            new_accuracy=self.new_accuracy[task_index],
            average_incremental_accuracy=self.average_incremental_accuracy,
        )


class IncrementMetrics(BaseModel):
    """A succeeded increment's ``metrics`` in the ledger (a failed one holds ``{"error": …}`` instead)."""

    model_config = ConfigDict(frozen=True)

    row: list[float]
    test_sizes: list[int]
    accuracy: float
    average_incremental_accuracy: float
    forgetting: float
    train_losses: list[float]
    gate: list[str]
    promoted: bool
