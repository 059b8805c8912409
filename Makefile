# The README's commands. Each bootstraps .venv from the pinned dependencies in pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
BRIDGE_STAMP := $(VENV)/.bridge-$(shell sha1sum pyproject.toml | cut -c1-12)
ARGS ?=
# Puts the tables the benchmarks just saved under build/bench/ into their README blocks.
README_TABLES := $(BIN)/python -m benchmarks.readme_tables

.PHONY: demo test lint bench bench-render bench-specimen bench-serve bench-idle bench-mqtt bench-segmentation bench-drills bench-adapt dataset clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

# The [bridge] extra (OpenFIBSEM, ~300 MB, ~30 s): the tests of `kintsugi bridge` need it; lint does not.
$(BRIDGE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bridge]'
	@rm -f $(VENV)/.bridge-* && touch $(BRIDGE_STAMP)

## the main job: a demo serial-sectioning run against the simulator (ARGS="--slices 48" to change it)
demo: $(STAMP)
	$(BIN)/kintsugi demo $(ARGS)

## lint, type-check and the whole test suite
test: lint $(BRIDGE_STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## benchmarks: print their figures and regenerate the README's tables from them (see README)
bench: bench-render bench-specimen bench-serve bench-idle bench-mqtt bench-segmentation bench-drills bench-adapt

bench-adapt: $(STAMP)
	$(BIN)/python -m benchmarks.bench_adapt $(ARGS)
	$(README_TABLES)

bench-serve: $(STAMP)
	$(BIN)/python -m benchmarks.bench_serve
	$(README_TABLES)

bench-idle: $(STAMP)
	$(BIN)/python -m benchmarks.bench_idle
	$(README_TABLES)

bench-mqtt: $(STAMP)
	$(BIN)/python -m benchmarks.bench_mqtt
	$(README_TABLES)

bench-segmentation: $(STAMP)
	$(BIN)/python -m benchmarks.bench_segmentation --quick $(ARGS)
	$(README_TABLES)

## the drills at full counts (20 random SIGKILLs, 10,000 fuzzed commands, disk full on a tmpfs: needs root)
bench-drills: $(STAMP)
	$(BIN)/python -m benchmarks.drills $(ARGS)
	$(README_TABLES)

bench-render: $(STAMP)
	$(BIN)/python -m benchmarks.bench_render
	$(README_TABLES)

bench-specimen: $(STAMP)
	$(BIN)/python -m benchmarks.bench_specimen
	$(README_TABLES)

dataset: $(STAMP)
	$(BIN)/kintsugi-sim dataset --out dataset $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
