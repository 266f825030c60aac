# agentd-oauth developer commands. `make test` and `make demo` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

OIDC := tests/e2e/oidc
# npm writes node_modules/.package-lock.json on every install that changes something
OIDC_STAMP := $(OIDC)/node_modules/.package-lock.json

.PHONY: test demo diagrams lint bench install e2e-deps clean tailnet

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The oidc-provider end-to-end suite's node modules: installed when npm is on PATH (a no-op
# once they match package-lock.json). Without npm, or offline, pytest's summary says loudly
# which real-peer suites it skipped and why.
$(OIDC_STAMP): $(OIDC)/package.json $(OIDC)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		echo "npm install in $(OIDC) (the oidc-provider end-to-end suite)"; \
		(cd $(OIDC) && npm install --no-audit --no-fund --silent) && touch $@ \
			|| echo "warning: npm install failed in $(OIDC): its end-to-end tests will be skipped"; \
	else \
		echo "warning: npm is not installed: the oidc-provider end-to-end tests will be skipped"; \
	fi

e2e-deps: $(OIDC_STAMP)

# pytest under coverage (branch, subprocesses included; pyproject.toml [tool.coverage]); the
# floor (fail_under) applies to the whole suite, not to a PYTEST_ARGS selection
test: $(STAMP) lint e2e-deps tailnet
	rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage combine -q
	$(BIN)/coverage report $(if $(PYTEST_ARGS),--fail-under=0)

# real tailscaled/tailscale + Tailscale's test control server for tests/tailnet (go.mod pins
# tailscale.com); an up-to-date build takes well under a second
TAILNET_BIN := build/tailnet
tailnet:
	@if command -v go >/dev/null 2>&1; then \
		cd tests/tailnet/testnet && go build -buildvcs=false -o ../../../$(TAILNET_BIN)/ \
			. tailscale.com/cmd/tailscaled tailscale.com/cmd/tailscale; \
	else \
		echo "*** go not found: the real-tailnet suite (tests/tailnet) will be SKIPPED ***"; \
	fi

demo: $(STAMP)
	$(BIN)/agentd demo

diagrams: $(STAMP)
	$(BIN)/python -m flowengine.diagrams diagrams

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ledger.py
	$(BIN)/python benchmarks/bench_tokens.py
	$(BIN)/python benchmarks/bench_timer.py
	$(BIN)/python benchmarks/bench_cli.py
	$(BIN)/python benchmarks/bench_api.py
	$(BIN)/python benchmarks/bench_vault.py
	$(BIN)/python benchmarks/bench_tailnet.py
	$(BIN)/python benchmarks/bench_hostile.py
	$(BIN)/python benchmarks/bench_remote.py
	$(BIN)/python benchmarks/bench_anything.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache .ruff_cache $(TAILNET_BIN)
