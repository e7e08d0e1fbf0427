# The two commands a newcomer needs: `make demo` and `make test`.
# Both create (or reuse) a virtual environment in .venv and install the package with pinned
# versions (constraints.txt pins torch==2.13.0 for reproducible CI; which build pip installs is
# the package index's choice: the CPU build (2.13.0+cpu) on this machine, the CUDA build from
# PyPI's default index on Linux x86_64).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-all reliability bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Lint, format check and type check (settings in pyproject.toml); `make test` runs them first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

reliability: $(STAMP)
	$(PY) -m pytest -q -m reliability -p tests.reliability_report

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) outputs multirun lightning_logs bench_results demo_results
