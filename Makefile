# Set-up and everyday commands. Everything lives in .venv inside the repository.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build; install it first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# quant: bitsandbytes (a 43 MB wheel, no new dependencies), so the nf4/int8 tests and the GPU check's dry run run
	$(BIN)/python -m pip install --quiet -e '.[test,quant]'
	touch $(STAMP)

# FLEx on the shipped tiny MoE and the builtin dataset; prints where its report is. The default
# run config, on two torch threads (a run's default is one: docs/guide.md, "The default budget").
demo: install
	$(BIN)/flexmoe run --set runtime.threads=2

# The fast tier (everything not marked slow) on two pytest-xdist workers: the everyday check.
# `make test-slow` runs the slow end-to-end tier (real Flower deployments, resumed runs, real
# widths); CI runs both. Tests of one Flower module share a worker (their deployment fixtures).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m slow --durations=10

# `make bench` runs every benchmark but those run by name; `make bench realshape` (or any names) only those
BENCH_NAMES := $(filter-out bench,$(MAKECMDGOALS))
bench: install
	$(BIN)/python -m pip install --quiet -e '.[test,quant,bench]'
	$(BIN)/python -m benchmarks $(BENCH_NAMES)

ifneq ($(filter bench,$(MAKECMDGOALS)),)
$(BENCH_NAMES):
	@:
endif

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
