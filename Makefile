# `make`       checks the Python packages (installs them with pip when missing), then builds the native W4A4
#              library (skipped with a one-line message when nvcc is absent; the package then uses the
#              pure-PyTorch reference ops)
# `make test`  runs the test suite (CPU; GPU tests skip without a device)
PYTHON ?= python3
RUNTIME_IMPORTS := import torch, safetensors, sentencepiece, tokenizers, PIL, numpy, cffi

.PHONY: all deps native test clean

all: deps native

# torch is installed first, pinned to the release we test with (a CPU or CUDA build, whatever pip finds for
# this machine); install your own torch beforehand to choose another build.
TORCH ?= torch==2.13.0

deps:
	@$(PYTHON) -c "$(RUNTIME_IMPORTS)" 2>/dev/null || { \
		echo "installing the runtime packages ($(TORCH) if torch is missing, then pip install -e .)"; \
		$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"; \
		$(PYTHON) -m pip install -e . ; }

native:
	@$(MAKE) --no-print-directory -C native

test: deps
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install pytest
	$(PYTHON) -m pytest -q tests

clean:
	@$(MAKE) --no-print-directory -C native clean
