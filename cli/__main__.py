"""``python -m strata.cli``: the ``strata`` command."""

from strata.cli.app import app

app(prog_name="strata")
