# cadre: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The Docker tests' image: a Debian rootfs with Python, imported into the tests' own dockerd (no registry).
TEST_ROOTFS := .cache/test-rootfs.tar
# Wheels the agents install pip_packages from in the tests (a loopback index: the tests have no network).
TEST_WHEELS := .cache/test-wheels

.PHONY: install demo test bench chaos fleet lint format up down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

install: $(STAMP)

# Needs debootstrap (and network access to Debian's mirror and PyPI); without it the Docker tests say so.
$(TEST_ROOTFS): tests/docker/build-rootfs.sh | $(STAMP)
	-tests/docker/build-rootfs.sh $@ $(BIN)/pip

# Needs PyPI; into a temporary folder first, so a failed download never looks done. Without it the tutorial test
# says so. The pin is the tutorial's (examples/sklearn-mnist/submit.py).
$(TEST_WHEELS): | $(STAMP)
	rm -rf $@.tmp && $(BIN)/pip download --quiet --only-binary=:all: --dest $@.tmp 'scikit-learn<1.8' \
		&& rm -rf $@ && mv $@.tmp $@ || rm -rf $@.tmp

## Start a local cluster, run the example training script end to end, register its model, stop the cluster.
demo: $(STAMP)
	$(BIN)/python examples/demo.py

## Lint, then the whole test suite against real nats-server, SeaweedFS, processes and a real dockerd.
test: $(STAMP) $(TEST_ROOTFS) $(TEST_WHEELS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

## Benchmarks (figures only; never a gate): prints a table, writes bench/results.json and docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench

## The fault suite (figures, never a gate): faults at random moments of a 2x2 run; writes docs/reliability.md.
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos

## A fleet on this machine (root): hosts as network namespaces, a 3-server NATS cluster, a 2-host MPI job.
fleet: $(STAMP)
	$(BIN)/python -m tests.fleet

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

up: $(STAMP)
	$(BIN)/cadre up

down: $(STAMP)
	$(BIN)/cadre down

clean:
	rm -rf $(VENV) .cadre .cache .pytest_cache .ruff_cache *.egg-info
