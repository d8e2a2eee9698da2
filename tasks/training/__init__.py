"""Training side effects: restoring a method from its state, the on-disk feature cache, multi-process runs."""
