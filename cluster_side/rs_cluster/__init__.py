"""Cluster side of the building-mask pipeline."""

__version__ = "0.1.0"
