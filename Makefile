# agentd-oauth developer commands. `make test` and `make demo` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo diagrams lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/agentd demo

diagrams: $(STAMP)
	$(BIN)/python -m flowengine.diagrams diagrams

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ledger.py
	$(BIN)/python benchmarks/bench_tokens.py
	$(BIN)/python benchmarks/bench_timer.py
	$(BIN)/python benchmarks/bench_cli.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache .ruff_cache
