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

DEV_DKIM_KEY := var/dkim/demo.sealrelay.example.dev.pem

run: $(STAMP) $(DEV_DKIM_KEY)
	$(BIN)/sealrelay db upgrade --config examples/dev.toml
	$(BIN)/sealrelay demo-agent --config examples/dev.toml
	@echo "SMTP on 127.0.0.1:2525, web on http://127.0.0.1:8080, outgoing copies in var/outbox/"
	$(BIN)/sealrelay serve --config examples/dev.toml

$(DEV_DKIM_KEY): | $(STAMP)
	$(BIN)/sealrelay dkim keygen --domain demo.sealrelay.example --selector dev --out $@ >/dev/null

# Installs chromium, swaks, postfix and nginx when missing (as root) and starts a throw-away
# PostgreSQL when none answers on 127.0.0.1:5432; see scripts/with-test-services.
# JOBS workers (pytest-xdist); JOBS=1 runs the suite in one process.
JOBS ?= 2
test: $(STAMP)
	scripts/with-test-services $(BIN)/pytest $(if $(filter 1,$(JOBS)),,-n $(JOBS))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/dkim.py
	$(BIN)/python bench/mime.py
	$(BIN)/python bench/relay.py --messages 2000 --size 5000 --sessions 20

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
