"""Data intake: batch validation, ingest (copy → DVC → git → ledger), readers, materialising a version."""
