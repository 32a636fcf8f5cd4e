# online-ctr: every target installs what it needs first.
#   make replay   replay the bundled real sample and write reports/replay/index.html
#   make test     install the test services (redis-server, prometheus) and run all tests

# The first interpreter that runs and is 3.11 or newer (a pyenv shim may exist but not run).
PYTHON ?= $(shell for candidate in python3.13 python3.12 python3.11 python3; do \
	$$candidate -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& command -v $$candidate && break; done)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
SAMPLE := data/samples/obd-small.jsonl.gz
REPORT := reports/replay
PYTEST_ARGS ?=

.PHONY: install install-services replay test test-unit lint format bench clean help

help:
	@sed -n 's/^#   //p' $(MAKEFILE_LIST)

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -n "$(PYTHON)" || { echo "online-ctr needs Python 3.11 or newer; install it or set PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[serve,test]'
	touch $@

install-services:
	bash scripts/install-system-deps.sh

replay: install
	$(BIN)/online-ctr replay --events $(SAMPLE) --report $(REPORT) --segment-by campaign --segment-by position $(ARGS)

test: install install-services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m 'not integration' $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check shared services tests bench
	$(BIN)/ruff format --check shared services tests bench

format: install
	$(BIN)/ruff format shared services tests bench
	$(BIN)/ruff check --fix shared services tests bench

bench: install
	$(BIN)/python bench/replay_throughput.py

clean:
	rm -rf $(VENV) reports .pytest_cache .ruff_cache
