# preforkd: everything builds from nothing with Python 3 and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test venv test-deps bench lint clean

run: $(STAMP)  ## the supervisor in the foreground on the built-in default (echo on tcp://127.0.0.1:7000)
	$(BIN)/preforkd run $(if $(CONFIG),-c $(CONFIG))

test: lint test-deps  ## lint, then the whole test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)  ## mypy --strict and ruff (configured in pyproject.toml); CI fails on either
	$(BIN)/mypy
	$(BIN)/ruff check src tests benchmarks examples

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	$(BIN)/python -m compileall -q src   # bytecode up front: a re-exec'd master starts faster
	touch $@

# Tools the tests drive for real (socat, systemd-socket-activate, systemd-analyze);
# installed from the system's packages when missing and we are root.
test-deps:
	@sh tests/install-tools.sh

bench: $(STAMP)  ## benchmarks against peers; writes docs/performance.md
	bash benchmarks/setup.sh
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
