"""Workspaces: settings, ``strata init``, and writes the file system refuses."""
