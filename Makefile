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

.PHONY: install demo test test-fast lint docs clean help

install: $(STAMP) ## create .venv: torch (pinned), lmforge with its test extras, DeepSpeed's CPU ops

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,harness]'
	$(BIN)/python -c 'from lm.train.engine import build_cpu_ops; build_cpu_ops()'  # DeepSpeed's CPU ops, once
	touch $@

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
test: lint ## ruff, then the whole suite (unit + integration: Ray, Serve, S3)
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
