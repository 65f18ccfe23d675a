# ELV: the two commands a fresh machine needs are `make run` and `make test`.
.PHONY: run test setup tools proto lint sanity demo clean

run: setup
	.venv/bin/python -m csi demo

test: setup tools
	scripts/test

setup:
	scripts/setup

tools:
	scripts/tools

proto: setup
	scripts/gen-proto

lint: setup
	.venv/bin/ruff check csi tests
	.venv/bin/ruff format --check csi tests
	.venv/bin/mypy csi

sanity: setup tools
	.venv/bin/python -m pytest -q -s tests/conformance/test_sanity.py

clean:
	rm -rf ci-out .mypy_cache .ruff_cache
