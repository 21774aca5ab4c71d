# o2o-jax. `make test` works on a fresh machine: it creates .venv and installs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

ENV ?= hopper

.PHONY: install test lint demo datasets bench-smoke bench-buffers bench-datasets bench-throughput clean

# The main job: each method beside its naive counterpart (benchmarks/demo.py), under 10 minutes on
# 2 CPU cores from a fresh clone, dataset generation included: TD3-C vs TD3 and ACA vs SAC -> SAC
# run live from the committed walker2d agents; BRED vs uniform replay and balanced replay vs online
# samples only are read from their committed 3-seed runs. Prints a table (the paper's claim, what
# the runs show, the 3-seed report) and writes one figure with a panel per method.
# DEMO_ARGS="--online-steps 10000" runs longer.
DEMO_ARGS ?=
demo: install
	$(PY) -m benchmarks.demo $(DEMO_ARGS)

install: $(STAMP)

# Re-installs only when requirements.txt or pyproject.toml changes (idempotent). The project
# itself is installed editable, so `common`, `algorithms` and `benchmarks` import from anywhere.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

# The whole suite, run before every commit: ruff first (seconds: CI checks the format too, and a
# format slip once failed a landing that `make test` had passed), then every test, one
# pytest-xdist worker per core (TEST_WORKERS=1 for a serial run). The scripts the tests start
# share one JAX compilation cache per session (tests/conftest.py). No test is left out: the
# former `make test-slow` selected none and was removed.
TEST_WORKERS ?= auto
test: install lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The five D4RL-recipe datasets of one env from the committed behaviour policies, then verified.
datasets: install
	$(PY) benchmarks/make_datasets.py --env $(ENV)
	for split in random medium medium-replay medium-expert expert; do \
		$(PY) -m common.dataset_cli verify $(ENV)-$$split-v2 || exit 1; done

# Every benchmark suite at the smoke budget (tiny datasets, seconds per run), then the reports
# (benchmarks/results/<suite>/smoke/, git-ignored). CI runs it. Larger budgets:
#   python -m benchmarks.run SUITE --budget cpu|paper, then python -m benchmarks.report SUITE ...
bench-smoke: install
	$(PY) -m benchmarks.run all --budget smoke --workers 2 --root runs/bench
	$(PY) -m benchmarks.report all --budget smoke --root runs/bench --strict

bench-datasets: install
	$(PY) benchmarks/bench_datasets.py --env $(ENV) --out benchmarks/results/bench_datasets_$(ENV).json

bench-throughput: install
	$(PY) benchmarks/bench_throughput.py --memory

bench-buffers: install
	$(PY) benchmarks/bench_buffers.py --out benchmarks/results/bench_buffers.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
