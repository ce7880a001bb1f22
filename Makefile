# One entry point for people and CI. `make run` installs what is needed (`make setup`: deploy/local/setup.sh, which
# installs no system package unless KLINES_SETUP_BROWSER=yes) and starts the whole pipeline locally on the replay
# exchange (klines run $(RUN_ARGS)); `make test` runs every check.
SHELL := /bin/bash
PY := .venv/bin/python
RUN_ARGS ?= --offline --duration 90

.PHONY: setup run test test-long lint typecheck unit integration e2e bench broker-start broker-stop clean

setup:
	@bash deploy/local/setup.sh

run: setup
	@$(PY) -m services.cli run $(RUN_ARGS)

lint: setup
	$(PY) -m ruff check services tests benchmarks
	$(PY) -m ruff format --check services tests benchmarks

typecheck: setup
	$(PY) -m mypy --strict services

test: lint typecheck
	$(PY) -m pytest -q -m "unit or integration or e2e"

unit: setup
	$(PY) -m pytest -q -m unit

integration: setup
	$(PY) -m pytest -q -m integration

e2e: setup
	$(PY) -m pytest -q -m e2e

# Whole-pipeline cases that take minutes (pipeline equals replay on a five-week tape, at real-time speed, with
# the aggregator stopped mid-tape) and the chaos tier (every service killed, every dependency down, bad input);
# CI runs them after `make test`.
test-long: setup
	$(PY) -m pytest -q --durations=40 --durations-min=5 -m "long or chaos"

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

broker-start: setup
	@deploy/kafka/kafka.sh start

broker-stop:
	@deploy/kafka/kafka.sh stop

clean: broker-stop
	rm -rf .state
