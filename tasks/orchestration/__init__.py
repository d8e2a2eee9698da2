"""Orchestration with Prefect: deployments from prefect.yaml, running them, artifacts, the gpu limit."""
