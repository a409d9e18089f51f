# Two entry points for a fresh clone: `make demo` and `make test`.
# Torch is installed first, on its own, so that the project's install finds it satisfied and
# no multi-GB CUDA build is pulled on a CPU machine. Override TORCH / TORCH_INDEX elsewhere, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.devinterp-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/devinterp demo $(DEMO_ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Exit status 5 means "no test selected": not a failure for the slow tier.
test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "slow" $(PYTEST_ARGS) || test $$? -eq 5

lint: $(STAMP)
	$(PY) -m ruff check devinterp tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
