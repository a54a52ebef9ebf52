PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/switchboard.yaml

.PHONY: run test lint typecheck check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/switchboard serve --config $(CONFIG) --host 127.0.0.1 --port 8080

lint: $(STAMP)
	$(BIN)/ruff check middleware connectors tests bench
	$(BIN)/ruff format --check middleware connectors tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: $(STAMP)
	$(BIN)/switchboard check flows config/switchboard.yaml

test: $(STAMP) lint typecheck check
	$(BIN)/switchboard test flows
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache

# Real engines, not part of `make test`: each builds its environment once under
# $${XDG_CACHE_HOME:-$$HOME/.cache}/switchboard (7-15 minutes the first time), then runs its tests.
.PHONY: test-rasa test-llm
test-rasa: $(STAMP)
	bash tests/peers/rasa.sh

test-llm: $(STAMP)
	bash tests/peers/llm.sh

# Tests that break things (nodes killed and stopped, a private PostgreSQL restarted, platform and
# engine faults, a soak at half capacity): not part of `make test`; .ci/run runs it after, ~12 min.
# SWITCHBOARD_SOAK_SECONDS shortens the soak (600 s) for a local run.
.PHONY: test-faults
test-faults: $(STAMP)
	$(BIN)/python -m pytest -m faults tests/faults -v -s -rs -p no:cacheprovider --durations=0
