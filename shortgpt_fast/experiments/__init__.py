"""Experiments built on the API: method comparisons and the architecture support matrix."""
