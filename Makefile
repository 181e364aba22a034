# nlsflow: `make pipeline TASK=math` runs the whole DAG; `make test` runs the tests. Both create .venv if needed.
TASK ?= math
PROFILE ?= tiny
RUN_DIR ?= runs/$(TASK)-$(PROFILE)
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

# torch is pinned first so that nothing pulls a CUDA build onto a CPU machine.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

pipeline: venv
	$(PY) -m flows.pipeline --runner $(RUNNER) --config configs/tasks/$(TASK).yaml \
		--config configs/profiles/$(PROFILE).yaml run_dir=$(RUN_DIR) $(ARGS)

# One stage alone, e.g. `make stage-search TASK=math` (its inputs must exist in RUN_DIR).
stage-%: venv
	$(PY) -m stages.$* --config configs/tasks/$(TASK).yaml --config configs/profiles/$(PROFILE).yaml run_dir=$(RUN_DIR) $(ARGS)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
