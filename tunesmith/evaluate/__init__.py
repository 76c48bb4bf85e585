"""Judging a model: generate on a test file and score it (predict.py), multiple-choice benchmarks (benchmark.py)."""
