# esprelay: `make run` starts the bridge, `make test` runs every check.
# Both set up what they need first (a .venv, and Debian tools the tests use).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
APT_TOOLS := swaks chromium systemd
# tests/test_e2e_proxy.py: a real HAProxy in front of esprelay (send-proxy, send-proxy-v2).
APT_TOOLS += haproxy
# tests/test_container.py: a Debian base by debootstrap, the Dockerfile built and run
# on it with podman (buildah beside it) and runc (crun fails on hybrid cgroups).
APT_TOOLS += podman buildah debootstrap runc
LINT_DIRS := $(wildcard src tests bench)

.PHONY: all setup tools postgres run test lint typecheck pytest bench clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

# Debian packages the test suite drives (swaks is a real SMTP client). Installed
# when missing and we can; under CI=true the tests fail rather than skip without them.
tools:
	@missing=""; for t in $(APT_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "warning: cannot install$$missing; the tests that need them will skip (fail under CI=true)"; \
	  fi; \
	fi

# The PostgreSQL spool tests use the local server on 127.0.0.1:5432 (they create and
# drop databases of their own). Started here when installed but not running; without
# it they skip, and under CI=true they fail.
postgres:
	@if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then \
	  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then \
	    for v in $$(ls /etc/postgresql); do \
	      echo "starting PostgreSQL $$v"; \
	      pg_ctlcluster --skip-systemctl-redirect $$v main start || true; \
	    done; \
	  fi; \
	fi

run: setup
	$(BIN)/esprelay serve

lint: setup
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck: setup
	$(BIN)/mypy src

pytest: setup tools postgres
	$(BIN)/pytest

test: lint typecheck pytest

# The performance benchmark (bench/README.md). Takes several minutes; pass options with
# BENCH_ARGS, e.g. make bench BENCH_ARGS="--sizes 2K --sessions 20,200 --repeats 5".
bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
