"""Looking at learners and moving their champion by hand: ``strata status``, ``promote``, ``rollback``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from strata.tasks.ledger.increments import increments, learners, promotions
from strata.tasks.ledger.migrate import ledger
from strata.tasks.ledger.store import Learner as LearnerRow
from strata.tasks.ledger.store import LedgerError, Promotion, find_learner
from strata.tasks.tracking import promotion, runs
from strata.tasks.workspace.setup import workspace_settings


def status(learner: str | None = None, workspace: Path | None = None) -> list[dict[str, Any]]:
    """Learners with their increments (A_t, Ā, version, status), classes and champion."""
    settings = workspace_settings(workspace)
    with ledger(settings.ledger_url) as session:
        rows = learners(session, learner)
        if learner is not None and not rows:
            raise LedgerError(f"no learner {learner!r} in this workspace; see `strata status`")
        return [_describe(session, row) for row in rows]


def _describe(session, learner: LearnerRow) -> dict[str, Any]:
    moves = promotions(session, learner)
    return {
        "learner": learner.name,
        "method": learner.method,
        "backbone": learner.backbone,
        "champion": moves[-1].model_version if moves else None,
        "increments": [
            {
                "task": i.task_index,
                "status": i.status,
                "version": i.model_version,
                "accuracy": i.metrics.get("accuracy"),
                "average_incremental_accuracy": i.metrics.get("average_incremental_accuracy"),
                "promoted": i.metrics.get("promoted"),
                "error": i.metrics.get("error"),
            }
            for i in increments(session, learner)
        ],
        "classes": sorted(c for v in learner.data_versions for c in v.classes),
        "promotions": [
            {
                "version": p.model_version,
                "previous": p.previous_version,
                "actor": p.actor,
                "reason": p.reason,
                "at": p.created.isoformat(timespec="seconds"),
            }
            for p in moves
        ],
    }


def promote(
    learner: str, version: str, workspace: Path | None = None, actor: str = "promote", reason: str = "promoted by hand"
) -> str | None:
    """Point ``champion`` at ``version`` (which must exist) and record it; returns the previous champion."""
    settings = workspace_settings(workspace)
    client = runs.configure(settings)
    name = runs.model_name(learner)
    promotion.version_tags(client, name, version)  # raises a clear error for an unknown version
    previous = promotion.alias_version(client, name, promotion.CHAMPION)
    with ledger(settings.ledger_url) as session:
        row = find_learner(session, learner)
        if row is None:
            raise LedgerError(f"no learner {learner!r} in this workspace")
        promotion.set_alias(client, name, promotion.CHAMPION, version)
        session.add(
            Promotion(
                learner_id=row.id, model_version=version, previous_version=previous, actor=actor, reason=reason[:1024]
            )
        )
    return previous


def rollback(learner: str, workspace: Path | None = None) -> str:
    """Move ``champion`` to the champion before the current one, skipping those already rolled back from, so
    rolling back again keeps walking back instead of swapping the last two; returns that version."""
    settings = workspace_settings(workspace)
    with ledger(settings.ledger_url) as session:
        row = find_learner(session, learner)
        moves = promotions(session, row) if row is not None else []
    standing = champion_stack(moves)
    if len(standing) < 2:
        raise LedgerError(f"learner {learner!r} has no earlier champion to roll back to; see `strata status`")
    current, target = standing[-1], standing[-2]
    promote(learner, target, workspace, actor="rollback", reason=f"rolled back from v{current}")
    return target


def champion_stack(moves: list[Promotion]) -> list[str]:
    """The champions still standing, oldest first, the current one last: every move of the alias pushes its
    version, a rollback takes the version it left off the top (it is never rolled back to again)."""
    stack = [moves[0].previous_version] if moves and moves[0].previous_version else []
    for move in moves:
        if move.actor == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != move.model_version:
            stack.append(move.model_version)
    return stack
