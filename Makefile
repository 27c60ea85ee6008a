# Set-up and the everyday commands. Needs only Python >= 3.11 with pip and venv.
#   make demo   create .venv, install everything, compress and evaluate the built-in model
#   make test   create .venv, install everything, run the test suite
#   make lint   ruff check, ruff format --check, mypy
#   EXTRAS=dev,gguf,compressed-tensors,onnx,federated,lm-eval make test   also the runtimes, Flower, lm-eval
PYTHON ?= python3
EXTRAS ?= dev
VENV ?= .venv
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup demo test test-all lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from the local CPU build, so that nothing pulls a CUDA build; then pinned
	$(BIN)/pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/lmpress demo

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m "not gpu"

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
