# ptlab: model library + QEMU testbed. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Selection: ARCH=x86_64|arm64|all, PROFILE=name[,name...] (ptharness.profiles.PROFILES),
# KERNEL=<series> (ptharness.profiles.KERNELS; empty: the default). ARCH and PROFILE
# intersect; with PROFILE given and no ARCH, ARCH is all (PROFILE=arm64 alone works).
PROFILE ?=
ifneq ($(PROFILE),)
ARCH ?= all
else
ARCH ?= x86_64
endif
KERNEL ?=
JOBS ?= auto
PYTEST_ARGS ?=
QEMU_TESTS ?= tests/qemu
# One artifacts folder per run (JUnit XML; on failure console, QMP transcript, report);
# `make test` hands its RUN_ID to the sub-makes.
ifndef RUN_ID
RUN_ID := $(shell date -u +%Y%m%dT%H%M%SZ)
endif
export RUN_ID
ARTIFACTS ?= $(CURDIR)/artifacts/$(RUN_ID)
SELECT := PTLAB_ARCH=$(ARCH) PTLAB_PROFILE=$(PROFILE) PTLAB_KERNEL=$(KERNEL) \
	PTLAB_ARTIFACTS=$(ARTIFACTS)

.PHONY: setup host-deps images test-unit test-qemu test bench lint clean stress test-stress-quick

setup: $(VENV)/.ptlab-setup

$(VENV)/.ptlab-setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

host-deps:
	@bash images/host-deps.sh

images: setup host-deps
	@$(BIN)/python -m ptharness.image --kernel "$(KERNEL)" --profile "$(PROFILE)" $(ARCH)

test-unit: setup
	$(BIN)/pytest -q -n $(JOBS) --junitxml=$(ARTIFACTS)/junit-unit.xml tests/unit

# The main job: every real-table test; the reduced leak/stress tests run in `make test`
# (test-stress-quick) and fully in `make stress`. The real-guest tests use no hypothesis:
# its plugin's import (0.6 s per process, three processes) is left out.
NO_HYPOTHESIS := -p no:hypothesispytest
test-qemu: images
	$(SELECT) $(BIN)/pytest -q -n $(JOBS) $(NO_HYPOTHESIS) --dist loadscope \
		-m "qemu and not stress" \
		--junitxml=$(ARTIFACTS)/junit-qemu$(if $(KERNEL),-$(KERNEL)).xml $(PYTEST_ARGS) $(QEMU_TESTS)

# images first, so that the unit tests that read the built images run too
# both real kernels (ptharness.profiles.KERNELS): Debian bookworm's 6.1 and 6.12
test: setup host-deps
	$(MAKE) images ARCH=all
	$(MAKE) images ARCH=all KERNEL=6.12
	$(MAKE) test-unit
	$(MAKE) test-qemu ARCH=all
	$(MAKE) test-qemu ARCH=all KERNEL=6.12
	$(MAKE) test-stress-quick

# A testbed that cannot leak (issue 8): 50 random kill cycles, 1,000 malformed agent commands,
# failure detection bounds, network surface; prints kill_cycles_clean, agent_errors_clean,
# leftovers. PTLAB_SEED=N replays; STRESS_ARGS="--cycles 6 --agent 100" for a short run.
STRESS_ARGS ?=
stress: images
	$(BIN)/python -m ptharness.stress --profile "$(or $(PROFILE),$(ARCH))" $(STRESS_ARGS)

test-stress-quick: images
	$(SELECT) $(BIN)/pytest -q -n $(JOBS) $(NO_HYPOTHESIS) -m stress \
		--junitxml=$(ARTIFACTS)/junit-stress.xml $(PYTEST_ARGS) tests/qemu

bench: setup
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/guest.py

# CI definitions: JSON-schema checks (SchemaStore's schemas, vendored by check-jsonschema);
# tests/unit/test_ci_matrix.py checks their matrices against the harness.
lint: setup
	$(BIN)/ruff check pylib harness tests bench
	$(BIN)/check-jsonschema -q --builtin-schema vendor.github-workflows .github/workflows/ci.yml
	$(BIN)/check-jsonschema -q --builtin-schema vendor.gitlab-ci .gitlab-ci.yml

clean:
	rm -rf $(VENV) images/cache guest/build
