# `make`       builds the native W4A4 library (skipped with a one-line message when nvcc is absent)
# `make test`  runs the test suite (CPU; GPU tests skip without a device)
PYTHON ?= python3

.PHONY: all native test clean

all: native

native:
	@$(MAKE) --no-print-directory -C native

test:
	$(PYTHON) -m pytest -q tests

clean:
	@$(MAKE) --no-print-directory -C native clean
