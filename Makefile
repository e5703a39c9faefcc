# drseg developer and user entry points. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
MODEL ?= test-tiny
CLASSES ?= water,grassland,farmland,road,building

.PHONY: install demo test lint format clean

# A stamp, not bin/drseg: a venv made by hand (the README's CPU-only torch first, even
# `pip install -e .` without the dev extra) still gets ".[dev]" once, keeping its torch.
STAMP := $(VENV)/.drseg-dev-installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Segment the bundled NAIP sample into a COG mask + GeoPackage polygons in demo_out/.
# test-tiny has random weights (no download needed); MODEL=vit-b16 uses real CLIP+DINO.
demo: install
	mkdir -p demo_out
	$(BIN)/drseg segment sample_tiles/naip_prairie_512.tif --classes "$(CLASSES)" \
		--model $(MODEL) -o demo_out/naip_prairie_mask.tif --vector \
		--uncertainty demo_out/naip_prairie_uncertainty.tif --overwrite

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf demo_out .pytest_cache .ruff_cache
