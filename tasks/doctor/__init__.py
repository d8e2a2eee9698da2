"""The doctor: the links between a workspace's stores (git, DVC, ledger, MLflow, exports), checked and repaired.

It reads every other room, so it has one of its own above them; nothing below imports it.
"""
