# lmforge: `make demo` (install + the main job) and `make test` (install + ruff + the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/shakespeare-cpu.yaml

# Every install (and every build environment pip creates) honours the one torch pin.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# DeepSpeed JIT-compiles its CPU ops once; keep the build between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/lmforge/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: install browser demo test test-fast lint docs clean help

install: $(STAMP) ## create .venv: torch (pinned), lmforge with its test extras, DeepSpeed's CPU ops

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,harness]'
	$(BIN)/python -c 'from lm.train.engine import build_cpu_ops; build_cpu_ops()'  # DeepSpeed's CPU ops, once
	touch $@

# The console's browser tests (tests/integration/test_console.py) drive headless Chromium through chromedriver,
# both from the OS packages (Debian: chromium, chromium-driver → /usr/bin/chromedriver), never a downloaded
# driver. Installed here when missing: as root, or through sudo without a password; present: nothing to do.
BROWSER_PKGS := chromium chromium-driver
browser: ## headless Chromium + chromedriver from the OS packages (the console's browser tests), if missing
	@if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	  if [ "$$(id -u)" = 0 ]; then run=; elif sudo -n true 2>/dev/null; then run="sudo -n"; else \
	    echo "make browser: install $(BROWSER_PKGS) from the OS packages (as root) for the browser tests" >&2; \
	    exit 1; fi; \
	  echo "installing $(BROWSER_PKGS) (apt-get)"; \
	  $$run env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	  $$run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PKGS) >/dev/null

# A two-trial Ray Tune sweep on the demo's shards, the main job (data → train → evaluation report →
# sample), Ray Serve hosts the trained model and answers one request through the openai client (with a
# random API key, printed, unless LMFORGE_API_KEYS is set), then
# one continual-learning iteration (new documents → fine-tune → gate → promote / reject) prints the registry.
demo: install ## the whole lifecycle on tinyshakespeare: sweep, main job, serve one answer, continual learning, the card
	$(BIN)/lm tune --config configs/tune/demo.yaml --resume
	$(BIN)/lm run --config $(CONFIG)
	@key=$${LMFORGE_API_KEYS:-sk-$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(24))')}; \
	  [ -n "$$LMFORGE_API_KEYS" ] || echo "API key of this demo (LMFORGE_API_KEYS, random): $$key"; \
	  LMFORGE_API_KEYS=$$key $(BIN)/lm serve --config $(CONFIG) --ask "ROMEO:"
	$(BIN)/lm continual --config $(CONFIG)
	@$(BIN)/lm summary --config $(CONFIG) --sweep configs/tune/demo.yaml

lint: install ## ruff over the repository
	$(BIN)/ruff check .

# The suite runs in a private network + PID namespace (only loopback) where the machine allows it,
# so Ray, Serve and the S3 server listen on 127.0.0.1 only; tests/isolated says when it cannot.
test: lint browser ## ruff, then the whole suite (unit + integration: Ray, Serve, S3, the console in Chromium)
	tests/isolated $(BIN)/pytest $(PYTEST_ARGS)

# The unit tests (no Ray, no S3 server): the inner loop, under 3 minutes.
test-fast: install ## the unit tests only (no Ray, no S3 server), under 3 minutes
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

docs: install ## regenerate docs/configuration.md from the config schema (lm config docs)
	$(BIN)/lm config docs

clean: ## remove .venv, the local object store and the caches
	rm -rf $(VENV) lmforge-store .pytest_cache .ruff_cache

# One line per target: the `## ...` comment on its rule line.
help: ## list the targets (and the variables they take)
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'
	@echo "variables: CONFIG=$(CONFIG) (demo), PYTEST_ARGS (test, test-fast), PYTHON=$(PYTHON) (install)"
