# ELV: the two commands a fresh machine needs are `make run` and `make test`.
.PHONY: run test soak setup tools k8s-tools engines proto lint sanity k8s-test e2e bench clean

# Quiet: the demo's table is all a first run prints (the driver logs to a file).
run:
	@scripts/setup
	@.venv/bin/python -m csi demo

test: setup tools k8s-tools engines
	scripts/test

# The long figures CI only samples: full kill counts, every LVM sanity configuration (scripts/soak).
soak: setup tools
	scripts/soak

setup:
	scripts/setup

tools:
	scripts/tools

k8s-tools:
	scripts/setup-k8s
	scripts/k8s-tools

# Docker, Podman and uidmap for tests/engines (Debian packages; no daemon is started).
engines:
	scripts/setup-engines

proto: setup
	scripts/gen-proto

lint: setup
	.venv/bin/ruff check csi tests
	.venv/bin/ruff format --check csi tests
	.venv/bin/mypy csi
	.venv/bin/lint-imports --no-logo

sanity: setup tools
	.venv/bin/python -m pytest -q -s tests/conformance/test_sanity.py

k8s-test: setup k8s-tools
	.venv/bin/python -m pytest -q -s tests/deploy tests/k8s

e2e: setup k8s-tools
	scripts/k8s-tools e2e
	ELV_E2E=1 .venv/bin/python -m pytest -q -s tests/k8s

bench: setup
	scripts/peer-tools
	.venv/bin/python -m csi bench $(BENCH_ARGS)

clean:
	rm -rf ci-out bench-out .mypy_cache .ruff_cache .import_linter_cache
