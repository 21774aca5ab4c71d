# o2o-jax. `make test` works on a fresh machine: it creates .venv and installs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

ENV ?= hopper

.PHONY: install test test-slow lint demo datasets bench-smoke bench-buffers bench-datasets bench-throughput clean

# The main job at a demo budget (~15 min on 2 CPU cores, dataset generation included): one method
# end to end, printing the normalized score before and after fine-tuning. The paper protocol is
# the same command without the budget flags.
# (--initial-online-fraction 0.75 and --first-epoch-multiplier 5 are the authors' README demo.)
DEMO_FLAGS := --ensemble-size 2 --offline-steps 5000 --bc-steps 1000 --offline-eval-every 5000 \
	--online-steps 10000 --checkpoint-every 5000 --initial-online-fraction 0.75 \
	--first-epoch-multiplier 5
demo: install
	$(PY) algorithms/off2on_balanced.py --env hopper-medium-v2 $(DEMO_FLAGS)

install: $(STAMP)

# Re-installs only when requirements.txt changes (idempotent).
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Default suite: fast tests only (tests marked `slow` are skipped; see `make test-slow`), one
# pytest-xdist worker per core (TEST_WORKERS=1 for a serial run).
TEST_WORKERS ?= auto
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The five D4RL-recipe datasets of one env from the committed behaviour policies, then verified.
datasets: install
	$(PY) benchmarks/make_datasets.py --env $(ENV)
	for split in random medium medium-replay medium-expert expert; do \
		$(PY) -m common.datasets verify $(ENV)-$$split-v2 || exit 1; done

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
