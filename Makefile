.PHONY: test test-fast quality style bench

test:
	python -m pytest

test-fast:
	python -m pytest -m "not slow"

quality:
	ruff check .
	ruff format --check .

style:
	ruff check --fix .
	ruff format .

bench:
	python -m bench.identity
	python -m bench.packing
