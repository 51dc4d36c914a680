# `make`       checks the Python packages (installs them with pip when missing), then builds the native W4A4
#              library (skipped with a one-line message when nvcc is absent; the package then uses the
#              pure-PyTorch reference ops)
# `make test`  runs the test suite (CPU; GPU tests skip without a device)
PYTHON ?= python3
RUNTIME_IMPORTS := import torch, safetensors, sentencepiece, tokenizers, PIL, numpy, cffi

.PHONY: all deps native test clean

all: deps native

deps:
	@$(PYTHON) -c "$(RUNTIME_IMPORTS)" 2>/dev/null || { \
		echo "installing the runtime packages: $(PYTHON) -m pip install -e ."; \
		$(PYTHON) -m pip install -e . ; }

native:
	@$(MAKE) --no-print-directory -C native

test: deps
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install pytest
	$(PYTHON) -m pytest -q tests

clean:
	@$(MAKE) --no-print-directory -C native clean
