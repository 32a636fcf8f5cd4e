# online-ctr: every target installs what it needs first.
#   make replay   replay the bundled real sample and write reports/replay/index.html
#   make test     install the test services (redis-server, prometheus) and run all tests
#   make demo        start the Docker stack and print the Grafana URL and what to look at
#   make demo-local  the same demo as local processes, for machines without Docker (Ctrl-C stops it)
#   make up | down | logs   start, stop (data kept) or follow the logs of the Docker stack
#   make env         write .env with fresh random secrets from .env.example, if it is missing

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

COMPOSE ?= docker compose
GRAFANA_PORT ?= 3000

.PHONY: install install-services replay test test-unit lint format bench clean help \
	env up down logs demo demo-local constraints dashboards

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

# Docker stack. docker-compose.yml reads its secrets from .env and stops when one is missing.

env:
	@$(or $(PYTHON),python3) deploy/write_env.py

up:
	@$(COMPOSE) version >/dev/null 2>&1 || { echo "\`$(COMPOSE)\` is not available; install Docker with the compose plugin, or run \`make demo-local\`" >&2; exit 1; }
	@test -f .env || { echo "no .env: run \`make env\` to generate secrets, or copy .env.example to .env and fill it in" >&2; exit 1; }
	$(COMPOSE) up --detach --build

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs --follow --tail=100

demo: env up
	@echo ""
	@echo "online-ctr is starting; \`$(COMPOSE) ps\` shows each service's health."
	@echo "  Grafana      http://127.0.0.1:$(GRAFANA_PORT)  (user admin, password GRAFANA_ADMIN_PASSWORD in .env)"
	@echo "  Prometheus   http://127.0.0.1:9090/alerts"
	@echo "  Scorer API   http://127.0.0.1:8000/docs"
	@echo "  (default ports; GRAFANA_PORT, PROMETHEUS_PORT and SCORER_PORT in .env change them)"
	@echo ""
	@echo "What to look at, in the online-ctr dashboard folder:"
	@echo "  Pipeline  impressions and clicks flow within a minute; negatives follow after the 5 min window."
	@echo "  Model     the first model appears after the first labels; its normalised entropy"
	@echo "            falls below the click-rate baseline's."
	@echo "  Serving   503s until the first model is loaded, then scored traffic and reloads."
	@echo "  Drift     after 10 minutes the simulated population changes: PSI, unseen categories"
	@echo "            and missing prices rise, and the drift alerts turn pending."
	@echo "Stop with \`make down\` (keeps the data) or \`$(COMPOSE) down --volumes\` (deletes it)."

demo-local: install install-services
	$(BIN)/online-ctr demo-local $(ARGS)

# Regenerate the image's pinned dependencies from the venv the tests ran in.
constraints: install
	$(BIN)/python deploy/freeze_constraints.py > constraints.txt

# Rewrite the Grafana dashboards from deploy/grafana/build_dashboards.py.
dashboards: install
	$(BIN)/python deploy/grafana/build_dashboards.py
