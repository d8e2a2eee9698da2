"""``strata doctor [--repair]``: check the links between the workspace's stores, and rebuild what survives.

Exit codes: 0 healthy (after ``--repair``: healthy once repaired), 4 problems remain (one line each above),
besides the usual 2 and 3 of ``strata.models.errors``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from strata.cli.common import WorkspaceOption, app, console
from strata.tasks.workspace.setup import workspace_settings

PROBLEMS_FOUND = 4


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def doctor(
    repair: Annotated[
        bool, typer.Option("--repair", help="rebuild what the surviving stores determine (deletes nothing registered)")
    ] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Check every data version, increment, registered version, alias, checkpoint and export of the workspace."""
    from strata.tasks.doctor.checks import check
    from strata.tasks.doctor.repair import repair as repair_workspace

    settings = workspace_settings(workspace)
    if repair:
        steps = repair_workspace(settings)
        for step in steps:
            _say(f"repaired {step}")
        if not steps:
            _say("nothing to repair")
    findings, checked = check(settings)
    for finding in findings:
        _say(str(finding))
    counts = f"{checked.data_versions} data versions, {checked.increments} increments checked"
    if findings:
        problems = "1 problem" if len(findings) == 1 else f"{len(findings)} problems"
        _say(f"workspace {settings.workspace}: {problems} ({counts})")
        raise typer.Exit(PROBLEMS_FOUND)
    _say(f"workspace {settings.workspace}: healthy ({counts})")
