# wsgate developer entry points. Everything installs into ./.venv; nothing global.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.example.toml
# Two install levels: `make run` needs only what serving needs (RUN_STAMP);
# the test, lint and typecheck targets (and `make install`) also install the
# `test` extra and the example plugin (STAMP), on top of it.
RUN_STAMP := $(VENV)/.installed-run
STAMP     := $(VENV)/.installed
PIP       := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install run test lint typecheck unit bench bench-peers soak conformance clean

# The venv is made without pip: where $(PYTHON) has a pip that can install into
# another interpreter (--python, pip >= 22.3), that pip installs wsgate
# into it, which spares the venv's own bootstrap (ensurepip, a few seconds);
# otherwise the venv bootstraps its own pip.
$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "wsgate needs Python 3.11 or newer" or 0)'
	$(PYTHON) -m venv --without-pip $(VENV)

$(RUN_STAMP): $(BIN)/python setup.cfg pyproject.toml
	@echo "installing wsgate (what serving needs) into $(VENV)"
	@# --no-compile: the server compiles only the modules it imports, once, at its
	@# first start, instead of pip compiling every file of every dependency.
	@# -qq: errors only (a machine's own pip settings, say an index folder that
	@# lacks a package, would otherwise print a warning per package).
	@if $(PYTHON) -m pip --python $(BIN)/python --version >/dev/null 2>&1; then \
	  $(PYTHON) -m pip --python $(BIN)/python install -qq --disable-pip-version-check \
	    --no-compile -e .; \
	else \
	  $(BIN)/python -m ensurepip --default-pip >/dev/null && $(PIP) -q --no-compile -e .; \
	fi
	touch $(RUN_STAMP)

# Serving needs no pip in the venv (the step above spares it two seconds); the
# test toolchain installs with the venv's own, brought in here.
$(STAMP): $(RUN_STAMP) setup.cfg pyproject.toml
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || \
	  $(PYTHON) -m pip --python $(BIN)/python install --quiet --disable-pip-version-check pip \
	  || $(BIN)/python -m ensurepip --default-pip >/dev/null
	$(PIP) --upgrade pip
	$(PIP) -e '.[test]'
	@# The worked third-party plugin example of docs/plugins.md, loaded by the tests by entry-point name.
	if [ -d examples/wsgate-example-plugin ]; then $(PIP) -e examples/wsgate-example-plugin; fi
	touch $(STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
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

# wsgate beside socket.io 4.8 on the shared harness (docs/performance.md, "Side by
# side with socket.io"): needs node and npm; the harness is copied to build/peers.
# PEERS_ARGS="--quick --scenario fanout --repeat 1" narrows a run.
PEERS ?= ../shared/peers
bench-peers: $(STAMP)
	$(BIN)/python -m bench.peers --peers $(PEERS) $(PEERS_ARGS)

# Larger hardening runs (more property examples, bigger storms); see docs/security.md.
soak: $(STAMP)
	WSGATE_SOAK=1 $(BIN)/python -m pytest -q tests/test_hardening.py tests/test_hardening_flow.py tests/test_crash.py tests/test_shutdown.py $(PYTEST_ARGS)

# RFC 6455 conformance, not part of `make test`: the Autobahn TestSuite's fuzzing
# client (cases 1-7 and 9) against wsgate's WebSocket layer in front of an echo
# (bench/ws_echo.py), loopback only; prints a summary per case group, the full
# report is left in .autobahn/reports. The suite is Python 2.7 code: it is
# installed once, with the pins of its own requires.txt, into .autobahn/site
# (git-ignored). CONFORMANCE_ARGS="--cases 5.* --exclude 9.1.6" narrows a run.
PYTHON27 ?= $(HOME)/.pyenv/versions/2.7.18/bin/python
AUTOBAHN := .autobahn
AUTOBAHN_VERSION := 25.10.1
AUTOBAHN_SDIST := $(AUTOBAHN)/sdist/autobahntestsuite-$(AUTOBAHN_VERSION).tar.gz

$(AUTOBAHN)/.installed:
	@test -x "$(PYTHON27)" || { echo "make conformance needs a Python 2.7 interpreter: PYTHON27=/path/to/python2.7"; exit 1; }
	rm -rf $(AUTOBAHN)/site $(AUTOBAHN)/sdist
	$(PYTHON27) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: -d $(AUTOBAHN)/sdist autobahntestsuite==$(AUTOBAHN_VERSION)
	tar -xzOf $(AUTOBAHN_SDIST) autobahntestsuite-$(AUTOBAHN_VERSION)/autobahntestsuite.egg-info/requires.txt > $(AUTOBAHN)/requires.txt
	$(PYTHON27) -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target $(AUTOBAHN)/site -r $(AUTOBAHN)/requires.txt $(AUTOBAHN_SDIST)
	touch $@

conformance: $(STAMP) $(AUTOBAHN)/.installed
	$(BIN)/python -m bench.conformance --site $(AUTOBAHN)/site --python27 $(PYTHON27) $(CONFORMANCE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
