"""Reproducible performance measurements; each writes JSON and a plot to ``results/``."""
