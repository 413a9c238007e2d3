# Two commands do everything on a new machine:
#   make demo   -> create .venv, install, segment a real ultrasound image with the bundled model
#   make test   -> create .venv, install, run ruff and the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/data

.PHONY: setup demo test lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip<26.2" setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-build-isolation "sam2==1.1.0"
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/uniultra segment --image $(DATA)/busi/images/benign_001.png \
		--box 193 88 236 113 --out out/demo_mask.png --overlay out/demo_overlay.png
	@echo "mask: out/demo_mask.png  overlay: out/demo_overlay.png"

lint: $(STAMP)
	$(BIN)/ruff check uniultra Testing benchmarks scripts UniUltraSegment UniUltraTrain

test: $(STAMP) lint
	$(BIN)/python -m pytest -x Testing

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py
