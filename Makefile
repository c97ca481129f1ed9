# fastssl: `make demo` and `make test` each set up everything they need on a fresh machine
# (system packages when missing, a .venv at the repository root, the package installed
# into it) and are cheap to run again once set up.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastssl-installed
DEMO_DATA := data/demo
# The pipelines' extras are part of the default install: their tests run in CI (CPU mode).
EXTRAS ?= all
# DALI's build: auto = the one matching the installed torch's CUDA (CPU-only torch: CUDA 12,
# the default), or 12 / 13 by hand (tools/dali_extra.py rewrites EXTRAS accordingly).
DALI_CUDA ?= auto

.PHONY: setup demo test test-fast clean-demo

setup: $(STAMP)

# torch is installed first (with the package): its CUDA decides which DALI build the extras bring.
$(STAMP): pyproject.toml tools/setup_system.sh tools/dali_extra.py
	@bash tools/setup_system.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	@extras=$$($(PY) tools/dali_extra.py --remove-other --cuda '$(DALI_CUDA)' '$(EXTRAS)') && \
	  echo "$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$$extras]'" && \
	  $(PY) -m pip install --quiet --disable-pip-version-check -e ".[$$extras]"
	@touch $@

$(DEMO_DATA)/manifest.json: tools/make_demo_dataset.py pipelines/demo_data.py pipelines/demo_images.py | $(STAMP)
	$(PY) tools/make_demo_dataset.py $(DEMO_DATA) --force

demo: setup $(DEMO_DATA)/manifest.json
	@$(PY) recipes/mira_demo.py

# The suite runs in TEST_WORKERS processes (pytest-xdist), each taking a whole test file at a time
# (a file's module-scoped fixtures are built once). Most tests are one Python thread: run serially,
# the suite kept CI's two cores 61% busy; with 2 workers 94% (docs/benchmarks.md, "Test suite").
TEST_WORKERS ?= 2
PYTEST_XDIST = -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PY) -m pytest -q $(PYTEST_XDIST)

test-fast: setup
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "not slow"

clean-demo:
	rm -rf $(DEMO_DATA) runs/demo
