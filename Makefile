# The project's checks, from the quickest to all of them (the environment: the README's test command
# sets it up; PYTHON may name another interpreter that has edgellm installed with its dev extra).
#
#   make lint        ruff: lint and format check (seconds)
#   make test-fast   lint, the C driver, and the Python tests that need neither the real SmolLM2
#                    bundle, nor qemu, nor a server or the NPU simulator, spread over the cores
#                    (pytest-xdist): under 3 minutes on 2 vCPUs
#   make armcost     the emulated Cortex-A76 cost of the Arm products (qemu instruction counts, a few
#                    minutes): fails when one is 10% over native/scripts/armcost_baseline.json
#   make test        everything: what .ci/run runs through the README's test command

PYTHON ?= .venv/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export EDGELLM_REQUIRE_NATIVE = 1

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test-fast: lint
	$(MAKE) -C native test CFLAGS="-O2 -Werror"
	$(PYTHON) -m pytest -q -n auto -m "not slow and not system"

armcost:
	$(PYTHON) native/scripts/armcost.py --baseline native/scripts/armcost_baseline.json

test: lint
	$(MAKE) -C native test CFLAGS="-O2 -Werror"
	native/scripts/test_arm.sh
	$(MAKE) armcost
	$(SUDO) boards/arm64/smoke.sh
	$(PYTHON) -m pytest -q

.PHONY: lint test-fast armcost test
