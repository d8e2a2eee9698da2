"""Workspaces: settings, ``strata init``, the identity that tells a workspace's stores apart, and writes the file system
refuses."""
