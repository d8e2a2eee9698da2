"""Tracking and registry in MLflow: runs, the pyfunc, reports, the promotion gate and aliases."""
