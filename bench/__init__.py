"""Benchmarks: `python -m bench` prints one table of ratios measured side by side in one run."""
