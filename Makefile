# dermflow: `make run` sets up everything and runs derm/full; `make test` sets up and tests.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The extras for this host: `dev`, plus `gpu` (JAX with CUDA, pinned in constraints-gpu.txt) on
# Linux x86_64 with an NVIDIA driver (`nvidia-smi -L` lists a GPU). Override: make EXTRAS=dev
ifndef EXTRAS
EXTRAS := $(shell $(PYTHON) -m dermflow.ops.gpu_env extras 2>/dev/null || echo dev)
endif
CONSTRAINTS := -c constraints.txt $(if $(findstring gpu,$(EXTRAS)),-c constraints-gpu.txt,)
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# Extra `prefect deployment run` options, e.g. ARGS="-p limit_per_label=20 -p epochs=1"
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv up down status run test test-unit test-integration bench-fetch bench-train bench-gpu bench-quality bench-quality-deployment bench-scale bench-archive-layouts bench-hash-scale clean

$(STAMP): pyproject.toml constraints.txt constraints-gpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "installing dermflow with extras [$(EXTRAS)]"
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	@touch $(STAMP)

venv: $(STAMP)

up: venv
	$(BIN)/dermflow up

down:
	@if [ -x $(BIN)/dermflow ]; then $(BIN)/dermflow down; else echo "no venv: nothing to stop"; fi

status: venv
	$(BIN)/dermflow status

# Runs the real job on the real dataset with the deployment's defaults (override with ARGS).
run: up
	set -a; source .env; set +a; $(BIN)/prefect deployment run derm/full --watch $(ARGS)

test: venv
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

test-integration: venv
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

bench-fetch: venv
	$(BIN)/python bench/bench_fetch.py $(ARGS)
	$(BIN)/python bench/bench_fetch_cpu.py
	$(BIN)/python bench/bench_fetch_shard.py

# The hash recipe's draft scale: CPU per image, planted copies found, false merges, on atlas20.
bench-hash-scale: venv
	$(BIN)/python bench/bench_hash_scale.py $(ARGS)

bench-scale: venv
	$(BIN)/python bench/bench_scale.py $(ARGS)

# derm/full on atlas20 from an archive in each layout, URLs dead; then import vs URL fetch rates.
bench-archive-layouts: venv
	$(BIN)/python bench/bench_archive_layouts.py $(ARGS)

bench-train: venv
	$(BIN)/python bench/bench_train.py

bench-gpu: venv
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(BIN)/python bench/bench_gpu.py

# The tuning issue's quality measurement, in-process (both recipes; writes $(QUALITY_JSON)) ...
QUALITY_JSON := .dermflow/bench/quality.json
bench-quality: venv
	mkdir -p $(dir $(QUALITY_JSON))
	$(BIN)/python bench/bench_quality.py --out $(QUALITY_JSON) $(ARGS)

# ... and through derm/full on the stack of `DERMFLOW_ALLOWED_HOSTS=127.0.0.1 make up`, one run
# per seed, scored by `dermflow evaluate` beside the report recipe's figure from $(QUALITY_JSON).
bench-quality-deployment: venv
	mkdir -p $(dir $(QUALITY_JSON))
	$(BIN)/python bench/bench_quality_deployment.py --report-json $(QUALITY_JSON) \
		--out $(dir $(QUALITY_JSON))quality_deployment.json $(ARGS)

clean: down
	rm -rf .dermflow test-artifacts
