# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both install everything they need on a fresh machine: the project venv (.venv),
# the Letta server's own venv (.letta-server), and Debian's redis-server if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install down

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

# nginx: CI checks the scale-out load balancer's configuration with it (tests/unit/test_compose_scale_out.py).
# chromium (Debian's): the console's browser test drives it headless (no step downloads a browser).
install: $(BIN)/.installed
	command -v docker-compose >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose)
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light)
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)
	$(BIN)/vtuber-letta stack install

demo: install
	$(BIN)/vtuber-letta demo

test: install lint
	$(BIN)/python -m pytest

# ruff: pyflakes, pycodestyle, import order, bugbear; mypy on the pure leaves (both set in pyproject.toml)
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

down: $(BIN)/.installed
	$(BIN)/vtuber-letta stack down
