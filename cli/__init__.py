"""The ``strata`` command line (``strata.cli.app:app``)."""
