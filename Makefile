# The two commands: `make run` (relay on embedded defaults) and `make test` (whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sealrelay db upgrade --config examples/dev.toml
	$(BIN)/sealrelay demo-agent --config examples/dev.toml
	@echo "SMTP on 127.0.0.1:2525, web on http://127.0.0.1:8080, outgoing copies in var/outbox/"
	$(BIN)/sealrelay serve --config examples/dev.toml

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/dkim.py
	$(BIN)/python bench/relay.py --messages 2000 --size 5000 --sessions 20

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
