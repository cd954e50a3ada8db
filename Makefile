# Two entry points for a fresh machine; each creates .venv on first use.
#   make demo   fit a sparse Bayesian MLP on the bundled digits data, prune it, print a table
#   make test   lint (ruff, pyproject.toml's [tool.ruff]) and run the test suite
# torch is pinned to the local CPU build by constraints.txt (an unpinned torch pulls CUDA wheels).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-full install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench --quick

bench-full: $(STAMP)
	$(PY) -m bench --full

clean:
	rm -rf $(VENV) runs .pytest_cache
