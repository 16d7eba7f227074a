# kvrelay: the README's two commands are `make serve` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# A CPU-only machine must not pull torch's multi-GB CUDA build: pin the CPU build there (pip finds it locally
# or on the index configured for pip). Where a GPU is present, any torch the range in pyproject.toml allows.
TORCH_CPU_SPEC ?= torch==2.13.0

.PHONY: install test lint serve protos clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q "torch>=2.4"; \
	  else $(BIN)/python -m pip install -q "$(TORCH_CPU_SPEC)"; fi; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

protos: $(STAMP)
	$(BIN)/python -m protos.generate

lint: $(STAMP)
	$(BIN)/ruff check .

# The embedded default model, 1 prefill worker and 1 decode group of 2 tensor-parallel ranks, router on PORT (gRPC)
# and HTTP_PORT (the OpenAI-compatible HTTP API, /health and /metrics).
# Extra `kvrelay serve` flags go in SERVE_ARGS (e.g. SERVE_ARGS="--model /path/to/llama --decode-groups 2").
PORT ?= 50051
HTTP_PORT ?= 8000
SERVE_ARGS ?=
serve: $(STAMP)
	$(BIN)/kvrelay serve --prefill-workers 1 --decode-groups 1 --decode-tp 2 --port $(PORT) --http-port $(HTTP_PORT) $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
