# synthflux — `make demo` and `make test` work on a fresh clone: they build .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# Installed before the package so that pip does not pick a multi-GB CUDA build on CPU boxes
# that carry a local CPU wheel; on a GPU host set TORCH="torch" to take PyPI's default build.
TORCH ?= torch==2.13.0
CONFIG ?= examples/tiny.toml
DATA ?= data
# The demo trains and classifies with the CNN's PyTorch twin, so it needs neither Julia nor Docker;
# DEMO_BACKEND=docker (after `make images`) or local (a julia with Flux) runs the Julia CNN.
DEMO_BACKEND ?= reference
BIN := $(VENV)/bin

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  make %-15s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) DATA=$(DATA) PYTHON=$(PYTHON) TORCH=$(TORCH)"

# The virtualenv is a stamp target: it is rebuilt when the package's requirements change.
$(BIN)/.stamp: python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e './python[dev]'
	touch $@

.PHONY: venv
venv: $(BIN)/.stamp ## create or update the virtualenv (.venv)

# The demo: scikit-learn's real digits (shipped in the package), half to fit the generator to,
# half to test on; the CNN learns from the synthetic digits alone (examples/digits.toml).
DEMO_CONFIG ?= examples/digits.toml
.PHONY: demo
demo: $(BIN)/.stamp ## do synthetic digits teach? fit, generate, train on them, test on real ones (DATA/demo, ~5 min)
	$(BIN)/synthflux digits $(DATA)/demo/digits
	$(BIN)/synthflux import $(DEMO_CONFIG) $(DATA)/demo/digits/train --as train --data $(DATA)/demo
	$(BIN)/synthflux import $(DEMO_CONFIG) $(DATA)/demo/digits/test --as test --data $(DATA)/demo
	$(BIN)/synthflux run $(DEMO_CONFIG) --data $(DATA)/demo --backend $(DEMO_BACKEND)

.PHONY: tiny
tiny: $(BIN)/.stamp ## the tiny random Stable Diffusion through every stage: plumbing, not learning (DATA/tiny)
	$(BIN)/synthflux run $(CONFIG) --data $(DATA)/tiny --backend $(DEMO_BACKEND)

.PHONY: lint
lint: $(BIN)/.stamp ## ruff (lint + format) and mypy
	$(BIN)/ruff check --config python/pyproject.toml python/src tests bench
	$(BIN)/ruff format --check --config python/pyproject.toml python/src tests bench
	cd python && ../$(BIN)/mypy

.PHONY: test
test: lint ## lint, then every test (what CI runs)
	cd tests && ../$(BIN)/pytest

# What needs no Docker engine, Slurm cluster or Julia, and nothing marked slow.
FAST := not docker and not slurm and not julia and not slow
.PHONY: test-fast
test-fast: lint ## lint, then the tests that need no Docker, Slurm or Julia (about 9 minutes on 2 cores)
	cd tests && ../$(BIN)/pytest -m "$(FAST)"

.PHONY: bench
bench: $(BIN)/.stamp ## the benchmarks in bench/ (print ratios measured side by side)
	$(BIN)/python bench/generate_overhead.py
	$(BIN)/python bench/preprocess_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/digits_cas.py
	$(BIN)/python bench/gpu.py
	$(BIN)/python bench/devices.py

.PHONY: clean
clean: ## remove the demo's and tiny's data and caches (not the virtualenv)
	rm -rf $(DATA)/demo $(DATA)/tiny .pytest_cache tests/.pytest_cache

# --- containers: the images, and every stage in them through compose.yaml (README "Containers")
PY_IMAGE ?= synthflux-python:latest
JULIA_IMAGE ?= synthflux-julia:latest
DATA_VOLUME ?= synthflux-data
# GPU=0 on a host without NVIDIA GPUs: leaves out compose.gpu.yaml (generate's GPU reservation).
GPU ?= 1
# Extra `docker build` flags, e.g. --build-arg BASE_IMAGE=<mirror>/pytorch:… or --network host.
DOCKER_BUILD_FLAGS ?=
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# One stage at a time (--no-deps): make stops at the first that fails, with its exit code.
COMPOSE_RUN = CONFIG="$(abspath $(CONFIG))" PY_IMAGE="$(PY_IMAGE)" JULIA_IMAGE="$(JULIA_IMAGE)" \
	DATA_VOLUME="$(DATA_VOLUME)" $(COMPOSE) -f compose.yaml $(if $(filter 1,$(GPU)),-f compose.gpu.yaml) \
	run --rm --no-deps

.PHONY: images
images: ## build the Python (PY_IMAGE) and Julia (JULIA_IMAGE) images
	docker build $(DOCKER_BUILD_FLAGS) -f docker/python.Dockerfile -t $(PY_IMAGE) .
	docker build $(DOCKER_BUILD_FLAGS) -f docker/julia.Dockerfile -t $(JULIA_IMAGE) .

# The local backend's answer to the image's sysimage: Flux, NPZ and SynthFluxModel, the warm-up's
# training and classification compiled in, for a julia that starts training at once
# (julia/README.md "Start-up"). Needs PackageCompiler where JULIA finds it (e.g. its default
# environment: julia -e 'using Pkg; Pkg.add("PackageCompiler")'); rebuild after Julia or Flux
# change (after an edit of julia/src, flux_model.jl compiles the sources instead, and says so).
# Then: [cnn] julia = "<this folder>/julia/build/bin/julia".
JULIA ?= julia
# The environment that holds Flux and NPZ (julia/, instantiated; or a stacked one, julia/README.md)
JULIA_ENV ?= julia
SYSIMAGE := julia/build/sysimage.so
# The warm-up runs once with --trace-compile; docker/julia-sysimage.jl, the build's `script`,
# includes SynthFluxModel and compiles the traced methods into the sysimage.
SYSIMAGE_ENV := SYNTHFLUX_JULIA_DIR="$(CURDIR)/julia" SYNTHFLUX_TRACE="$(CURDIR)/julia/build/warmup-trace.jl"
SYSIMAGE_JL := using PackageCompiler; create_sysimage([:Flux, :NPZ]; \
	sysimage_path="$(SYSIMAGE)", script="docker/julia-sysimage.jl")
.PHONY: julia-sysimage
julia-sysimage: ## build julia/build/sysimage.so and julia/build/bin/julia, a julia that uses it
	mkdir -p julia/build/bin
	$(SYSIMAGE_ENV) $(JULIA) --project=$(JULIA_ENV) --trace-compile=julia/build/warmup-trace.jl \
		docker/julia-warmup.jl
	$(SYSIMAGE_ENV) $(JULIA) --project=$(JULIA_ENV) -e '$(SYSIMAGE_JL)'
	printf '#!/bin/sh\nexec %s -J%s "$$@"\n' "$$(command -v $(JULIA))" "$(CURDIR)/$(SYSIMAGE)" \
		> julia/build/bin/julia
	chmod 755 julia/build/bin/julia
	@echo "julia-sysimage: set [cnn] julia = \"$(CURDIR)/julia/build/bin/julia\""

.PHONY: all
all: images ## images, then every stage in containers on volume DATA_VOLUME; results to DATA/containers
	$(COMPOSE_RUN) generate
	$(COMPOSE_RUN) preprocess
	$(COMPOSE_RUN) train-prepare
	$(COMPOSE_RUN) train
	$(COMPOSE_RUN) train-collect
	$(COMPOSE_RUN) classify
	$(COMPOSE_RUN) collect
	$(COMPOSE_RUN) evaluate
	$(COMPOSE_RUN) report
	mkdir -p $(DATA)/containers
	cid=$$(docker create -v $(DATA_VOLUME):/data:ro $(PY_IMAGE)) && { \
		rc=0; for d in model evaluation report; do \
			docker cp $$cid:/data/$$d $(DATA)/containers/ || { rc=1; break; }; done; \
		docker rm $$cid >/dev/null; exit $$rc; }
	@echo "copied model/, evaluation/ and report/ from volume $(DATA_VOLUME) to $(DATA)/containers/"

.PHONY: test-images
test-images: $(BIN)/.stamp ## only the container tests (part of `make test`): compose, lint, the Python image
	cd tests && ../$(BIN)/pytest test_containers.py
