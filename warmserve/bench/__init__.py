"""Benchmarks (not tests): run each as `python -m warmserve.bench.<name>`."""
