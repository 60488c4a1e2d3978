# virtmig: `make demo` and `make test` work on a fresh clone; each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv demo test faults fuzz lint proto bench e2e image clean typecheck-tree mutate man \
	prom-screenshot bench-figures

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) deploy/demo.py

# README "Metrics": two daemons, a real Prometheus scraping them every second through a two-minute
# test run, and headless Chromium's screenshots of its graph page in docs/prometheus-*.png.
# Needs Debian's prometheus and chromium; loopback only; not part of make test or CI.
PROM_SCREENSHOT_ARGS ?=
prom-screenshot: $(STAMP)
	$(PY) deploy/prometheus/screenshot.py $(PROM_SCREENSHOT_ARGS)

# Two pytest-xdist workers, each taking the next test as it goes; tests/conftest.py orders the
# long ones (e2e, then QEMU and netns) first, so that both end on short ones together
# (TEST_WORKERS=0: no workers, one process).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup) \
		$(PYTEST_ARGS)

# The fault-injection matrix (tests/faults: root, network namespaces, QEMU; marker faults, which
# make test leaves out): every case, rewriting docs/recovery.md from the run.  FAULTS=ci runs the
# representative subset (marker faults_ci) and leaves docs/recovery.md alone.
FAULTS ?= all
faults: $(STAMP)
	$(if $(filter ci,$(FAULTS)),,VIRTMIG_FAULTS_REPORT=docs/recovery.md) $(PY) -m pytest -q \
		-m $(if $(filter ci,$(FAULTS)),faults_ci,faults) tests/faults $(PYTEST_ARGS)
# The container image (deploy/Containerfile; README "Running on two hosts"): its context in
# build/image (the virtmig wheel and its dependencies' wheels, the default config), the Debian
# packages from the base image's apt sources.  CONTAINER=docker works too.
CONTAINER ?= podman
IMAGE ?= localhost/virtmig
BASE_IMAGE ?= debian:bookworm-slim
IMAGE_ARGS ?=
image: $(STAMP)
	rm -rf build/image
	mkdir -p build/image/wheels
	$(PY) -m pip wheel --quiet --wheel-dir build/image/wheels .
	cp deploy/container/virtmigd.toml build/image/
	$(CONTAINER) build $(if $(filter podman,$(CONTAINER)),--format docker) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) $(IMAGE_ARGS) -t $(IMAGE) \
		-f deploy/Containerfile build/image

# Every host a container (tests/containers, marker `containers`; README "Integration tests in
# containers"): needs root, podman, runc and mmdebstrap.  `make test` never collects them.
E2E_TIMEOUT ?= 2400
e2e: $(STAMP)
	VIRTMIG_E2E=1 $(PY) -m pytest -q -p no:xdist --timeout=$(E2E_TIMEOUT) -m containers \
		tests/containers $(PYTEST_ARGS)

# The property-based tests of tests/fuzz with the long hypothesis profile (thousands of examples
# per test, a new sample each run; no per-test time limit).  `make test` runs them short.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q --timeout=0 tests/fuzz $(PYTEST_ARGS)

# mypy needs a `virtmig/` tree: the packages live in proto/, daemon/, client/, testing/ (see
# pyproject).
typecheck-tree:
	@mkdir -p build/typecheck/virtmig
	@ln -sfn ../../../proto build/typecheck/virtmig/proto
	@ln -sfn ../../../daemon build/typecheck/virtmig/daemon
	@ln -sfn ../../../client build/typecheck/virtmig/client
	@ln -sfn ../../../testing build/typecheck/virtmig/testing
	@ln -sfn ../../../pkg/__init__.py build/typecheck/virtmig/__init__.py
	@ln -sfn ../../../pkg/py.typed build/typecheck/virtmig/py.typed

# Man pages (virtmig.1, virtmigd.8) and bash completion scripts, from the parsers, in build/docs.
man: $(STAMP)
	$(PY) -m virtmig.client.cli.docs build/docs

lint: $(STAMP) typecheck-tree
	$(VENV)/bin/ruff check .
	cd build/typecheck && MYPYPATH=. ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p virtmig
	MYPYPATH=build/typecheck $(VENV)/bin/mypy --config-file pyproject.toml tests deploy bench

# Mutation testing (README "Mutation testing"; scope and tests: [tool.mutmut] in pyproject).
# mutmut names a mutant after its file's path and copies the tree it mutates into mutants/, so it
# runs in build/mutate, where virtmig/ is the import package as a tree of symlinks to the source
# files (mutmut does not descend into symlinked folders).  Results stay in build/mutate/mutants
# between runs: only changed functions are tested again.  MUTMUT_ARGS picks mutants, one module
# at a time on a shared machine, e.g. MUTMUT_ARGS='"virtmig.proto.compat*"'; MUTMUT_JOBS is how
# many mutants run at once.
MUTATE := build/mutate
MUTMUT_JOBS ?= 1
mutate: $(STAMP)
	@rm -rf $(MUTATE)/virtmig
	@mkdir -p $(MUTATE)/virtmig
	@for d in proto daemon client testing; do cp -rs $(CURDIR)/$$d $(MUTATE)/virtmig/$$d; done
	@cp -s $(CURDIR)/pkg/__init__.py $(CURDIR)/pkg/py.typed $(MUTATE)/virtmig/
	@find $(MUTATE)/virtmig -name __pycache__ -prune -exec rm -rf {} +
	@ln -sfn ../../tests $(MUTATE)/tests
	@ln -sfn ../../pyproject.toml $(MUTATE)/pyproject.toml
# PYTHONPATH: a process a test starts (a daemon, a caller) imports the mutated tree too,
# whatever its working directory or entry point (MUTATION.md "How it is set up").
	cd $(MUTATE) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH PYTHONPATH=$(CURDIR)/$(MUTATE)/mutants \
		mutmut run --max-children $(MUTMUT_JOBS) $(MUTMUT_ARGS)
	cd $(MUTATE) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH mutmut results

proto: $(STAMP)
	PYTHON=$(PY) proto/gen.sh

# Every benchmark (bench/all.py: run.py, qemu_vs_qmp.py, and libvirt_vs_virtmig.py, which needs
# root and Debian's libvirt; those whose needs are missing say so and are skipped), results in
# bench/results/*.json, one table, then the figures (bench/*.png, matplotlib from the bench extra,
# which the venv includes so that make lint type-checks bench/figures.py).
# BENCH_ARGS, e.g. --only run --args "run=--runs 3".
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) bench/all.py $(BENCH_ARGS)

# Only the figures, from the results of the last make bench.
bench-figures: $(STAMP)
	$(PY) bench/figures.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
