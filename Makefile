# wsgate developer entry points. Everything installs into ./.venv; nothing global.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.example.toml
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck unit bench soak clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "wsgate needs Python 3.11 or newer" or 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# The worked third-party plugin example of docs/plugins.md, loaded by the tests by entry-point name.
	if [ -d examples/wsgate-example-plugin ]; then $(BIN)/python -m pip install --quiet -e examples/wsgate-example-plugin; fi
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/wsgate serve --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check wsgate plugins tests $(wildcard bench examples)

typecheck: $(STAMP)
	$(BIN)/mypy wsgate plugins

unit: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Larger hardening runs (more property examples, bigger storms); see docs/security.md.
soak: $(STAMP)
	WSGATE_SOAK=1 $(BIN)/python -m pytest -q tests/test_hardening.py tests/test_hardening_flow.py tests/test_crash.py tests/test_shutdown.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
