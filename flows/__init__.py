"""Entry points: what a user, the ``strata`` CLI or a schedule starts."""
