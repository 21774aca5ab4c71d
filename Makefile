# o2o-jax. `make test` works on a fresh machine: it creates .venv and installs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint bench-buffers clean

install: $(STAMP)

# Re-installs only when requirements.txt changes (idempotent).
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Default suite: fast tests only (tests marked `slow` are skipped; see `make test-slow`).
test: install
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-buffers: install
	$(PY) benchmarks/bench_buffers.py --out benchmarks/results/bench_buffers.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
