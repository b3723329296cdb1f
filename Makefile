# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOOM_TEST_PG ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: all demo test test-sqlite test-pg lint bench clean sysdeps venv

all: test

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) sysdeps

# Debian packages the real sandbox, overlay, bus and browser tests need; installed only when missing.
sysdeps:
	@missing=""; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v nebula >/dev/null || missing="$$missing nebula"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v nats-server >/dev/null || missing="$$missing nats-server"; \
	command -v setpriv >/dev/null && command -v nsenter >/dev/null || missing="$$missing util-linux"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: venv
	$(BIN)/loom up --agents 3 --demo

test: venv
	LOOM_TEST_DB=sqlite $(BIN)/pytest -q -p no:cacheprovider
	LOOM_TEST_DB=$(LOOM_TEST_PG) $(BIN)/pytest -q -p no:cacheprovider tests/coordinator tests/integration tests/client tests/explorer

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: venv
	for b in bench/*.py; do $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
