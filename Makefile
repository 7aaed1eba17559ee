# Two entry points for a fresh machine (see README.md):
#   make demo   - create .venv if needed, then run the whole consortium on this machine
#   make test   - create .venv if needed, then lint, type-check, check protos and the
#                 dashboard, install Prometheus if missing (for its test), run pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# pytest-xdist workers: integration tests mostly wait on real processes, so two
# share two cores (three overloaded them: Ray workers missed their start deadlines).
# --dist loadfile keeps each module in one worker, so a module-scoped stack starts
# once (loadgroup's xdist_group marks are not honoured under pytest 9.2 with xdist 3.8:
# the @group suffix never reaches the scheduler).
PYTEST_WORKERS ?= 2

.PHONY: demo test lint protos dashboard

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/coordinator demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python -m deploy.grafana.build --check

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

dashboard: $(STAMP)
	$(BIN)/python -m deploy.grafana.build

test: lint
	bash scripts/ensure-prometheus.sh
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile
