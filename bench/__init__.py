"""Benchmarks: `python -m bench.identity` compares tunesmith's identity run with a plain Trainer + peft script."""
