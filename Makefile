# Every target builds its own virtualenv first: a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# `make run` is for trying it out on this machine: webhooks may reach receivers on loopback.
run: $(STAMP)
	GATEWAY_WEBHOOK_ALLOW_NETS=$${GATEWAY_WEBHOOK_ALLOW_NETS:-127.0.0.0/8} $(BIN)/gateway serve

test: $(STAMP)
	$(BIN)/python -m pytest

check: $(STAMP)
	$(BIN)/ruff format --check gateway tests bench examples
	$(BIN)/ruff check gateway tests bench examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/callbacks.py
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/webhooks.py

clean:
	rm -rf $(VENV) gateway-data .pytest_cache .mypy_cache .ruff_cache
