"""Reproducible speed, convergence and approximation-quality measurements:
``python -m benchmarks``."""
