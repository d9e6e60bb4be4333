# preforkd: everything builds from nothing with Python 3 and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Two steps, so that `make run` does not wait for the test and lint tools.
STAMP      := $(VENV)/.installed
STAMP_DEV  := $(VENV)/.installed-dev
# make install: where (see scripts/install.sh); DESTDIR stages into another root.
PREFIX ?= /usr/local
DESTDIR ?=
WHEELS ?=

.PHONY: run test venv test-deps bench lint install clean

run: $(STAMP)  ## the supervisor in the foreground on the built-in default (echo on tcp://127.0.0.1:7000)
	@echo "make run: starting preforkd (Ctrl-C stops it)"
	$(BIN)/preforkd run $(if $(CONFIG),-c $(CONFIG))

# The suite runs in TEST_JOBS processes (pytest-xdist): its tests mostly wait on real
# daemons and clients, so three share two cores well. TEST_JOBS=0 runs them in one.
TEST_JOBS ?= 3

test: lint test-deps  ## lint, then the whole test suite
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) $(PYTEST_ARGS)

lint: $(STAMP_DEV)  ## mypy --strict and ruff (configured in pyproject.toml); CI fails on either
	$(BIN)/mypy
	$(BIN)/ruff check src tests benchmarks examples

venv: $(STAMP_DEV)

# Progress is shown step by step: a first build takes a while.
$(STAMP): pyproject.toml
	@echo "make: [1/3] creating $(VENV) with $(PYTHON) -m venv"
	$(PYTHON) -m venv $(VENV)
	@echo "make: [2/3] installing preforkd and its dependencies into $(VENV) (pip; a first build downloads them)"
	$(BIN)/pip install -q --disable-pip-version-check --progress-bar off --upgrade pip
	$(BIN)/pip install --disable-pip-version-check --progress-bar off -e . \
	    | grep -E '^(Collecting|Successfully installed)' || true
	@test -x $(BIN)/preforkd || { echo "make: pip did not install preforkd (see above)"; exit 1; }
	@echo "make: [3/3] compiling bytecode (a re-exec'd master starts faster)"
	$(BIN)/python -m compileall -q src
	touch $@

$(STAMP_DEV): $(STAMP)
	@echo "make: installing the test and lint tools into $(VENV)"
	$(BIN)/pip install -q --disable-pip-version-check --progress-bar off -e '.[test,lint]'
	touch $@

# Tools the tests drive for real (socat, systemd-socket-activate, systemd-analyze,
# debootstrap and systemd-nspawn for the real-systemd test); installed from the
# system's packages when missing and we are root.
test-deps:
	@sh tests/install-tools.sh

install:  ## venv in /opt/preforkd/venv, $(PREFIX)/bin/preforkd, /etc/preforkd/preforkd.toml, units (scripts/install.sh)
	DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' PYTHON='$(PYTHON)' sh scripts/install.sh $(if $(WHEELS),--wheels '$(WHEELS)')

bench: $(STAMP_DEV)  ## benchmarks against peers; writes docs/performance.md
	bash benchmarks/setup.sh
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
