"""The ``strata`` command line: thin commands, one module per command group, that call the flows and tasks.

Each command module registers its commands on the one Typer app (``strata.cli.common``) when imported;
importing them here, in this order, is what ``strata --help`` lists.
"""

from __future__ import annotations

from strata.cli import benchmark, data, demo, doctor, learn, orchestration, serving  # noqa: F401  (registers the commands)
from strata.cli.common import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
