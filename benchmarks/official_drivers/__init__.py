"""Drivers that time the official code of each method; each runs as a script in its own interpreter."""
