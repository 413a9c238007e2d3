# Two commands do everything on a new machine:
#   make demo   -> create .venv, install, segment a real ultrasound image with the bundled model
#   make test   -> create .venv, install, run ruff and the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip<26.2" setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-build-isolation "sam2==1.1.0"
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

# The demo image ships in the repository (carotid B-mode frame, CC BY 4.0; see its README), so
# `make demo` works on a bare clone; DEMO_IMAGE/DEMO_BOX choose another.
DEMO_IMAGE ?= UniUltraSegment/Resources/SampleData/CarotidUS.png
DEMO_BOX ?= 50 132 123 199

demo: $(STAMP)
	mkdir -p out
	$(BIN)/uniultra segment --image $(DEMO_IMAGE) --box $(DEMO_BOX) \
		--out out/demo_mask.png --overlay out/demo_overlay.png
	@echo "mask: out/demo_mask.png  overlay: out/demo_overlay.png"

lint: $(STAMP)
	$(BIN)/ruff check uniultra Testing benchmarks scripts UniUltraSegment UniUltraTrain Utilities

test: $(STAMP) lint
	$(BIN)/python -m pytest -x Testing

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py
