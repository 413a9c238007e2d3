# Two commands do everything on a new machine:
#   make demo   -> create .venv, install, segment a real ultrasound image with the bundled model
#   make test   -> create .venv and .venv-web, install, run ruff and the test suite (browser tests included)
#   make web    -> UniUltra Web on http://127.0.0.1:8080/ (WEB_ARGS="FILE_OR_FOLDER --port N ...")
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# UniUltra Web has its own environment: trame-slicer 2.0's compiled layer pins slicer-core 5.11
# (pyproject.toml, extra "web"); the project's MRML tests run in both environments.
WEB_VENV := .venv-web
WEB_BIN := $(WEB_VENV)/bin
WEB_STAMP := $(WEB_VENV)/.installed
WEB_ARGS ?= UniUltraSegment/Resources/SampleData/CarotidUS.png
WEB_MRML_TESTS := Testing/test_mrml_geometry.py Testing/test_mrml_segments.py Testing/test_mrml_sequences.py \
	Testing/test_mrml_logic.py

.PHONY: setup demo test lint bench web web-setup web-test chromium

setup: $(STAMP) web-setup

# One recipe for both environments (the pins in one place): $(1) its folder, $(2) the project's pip extra
define make_venv
	$(PY) -m venv $(1)
	$(1)/bin/pip install -q --upgrade "pip<26.2" setuptools wheel
	$(1)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 $(1)/bin/pip install -q --no-build-isolation "sam2==1.1.0"
	$(1)/bin/pip install -q --no-build-isolation -e ".[$(2)]"
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml Makefile
	$(call make_venv,$(VENV),dev)

# The demo image ships in the repository (carotid B-mode frame, CC BY 4.0; see its README), so
# `make demo` works on a bare clone; DEMO_IMAGE/DEMO_BOX choose another.
DEMO_IMAGE ?= UniUltraSegment/Resources/SampleData/CarotidUS.png
DEMO_BOX ?= 50 132 123 199

$(WEB_STAMP): pyproject.toml Makefile
	$(call make_venv,$(WEB_VENV),web)

# Debian's chromium for the browser tests (Playwright drives /usr/bin/chromium; no `playwright
# install`).  Installed when this runs as root with apt-get; otherwise the browser tests skip and
# say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser tests (marker web) will skip"; \
	  else echo "chromium missing (needs root + apt-get): the browser tests (marker web) will skip"; fi; }

web-setup: $(WEB_STAMP) chromium

web: $(WEB_STAMP)
	PYTHONPATH=UniUltraWeb $(WEB_BIN)/python -m uniultra_web $(WEB_ARGS)

web-test: web-setup
	$(WEB_BIN)/python -m pytest -x -p no:cacheprovider UniUltraWeb/Testing $(WEB_MRML_TESTS)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/uniultra segment --image $(DEMO_IMAGE) --box $(DEMO_BOX) \
		--out out/demo_mask.png --overlay out/demo_overlay.png
	@echo "mask: out/demo_mask.png  overlay: out/demo_overlay.png"

lint: $(STAMP)
	$(BIN)/ruff check uniultra Testing benchmarks scripts UniUltraSegment UniUltraTrain Utilities UniUltraWeb

test: $(STAMP) lint web-test
	$(BIN)/python -m pytest -x Testing

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py
