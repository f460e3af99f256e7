# ptlab: model library + QEMU testbed. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH ?= x86_64
JOBS ?= auto

ifeq ($(ARCH),all)
ARCHES := x86_64 arm64
else
ARCHES := $(ARCH)
endif

.PHONY: setup host-deps images test-unit test-qemu test bench lint clean

setup: $(VENV)/.ptlab-setup

$(VENV)/.ptlab-setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

host-deps:
	@bash images/host-deps.sh

images: setup host-deps
	@for a in $(ARCHES); do $(BIN)/python -m ptharness.image $$a || exit 1; done

test-unit: setup
	$(BIN)/pytest -q -n $(JOBS) tests/unit

test-qemu: images
	PTLAB_ARCH=$(ARCH) $(BIN)/pytest -q -n $(JOBS) --dist loadscope -m qemu tests/qemu

# images first, so that the unit tests that read the built images run too
test: setup host-deps
	$(MAKE) images ARCH=all
	$(MAKE) test-unit
	$(MAKE) test-qemu ARCH=all

bench: setup
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/guest.py

lint: setup
	$(BIN)/ruff check pylib harness tests bench

clean:
	rm -rf $(VENV) images/cache guest/build
