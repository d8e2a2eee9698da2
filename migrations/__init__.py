"""The ledger's alembic migrations (``strata db …``), shipped as ``strata.migrations``."""
