"""The ledger: Strata's own SQL state (learners, data versions, increments, leases) and its migrations."""
