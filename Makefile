# Two commands on a fresh machine: `make demo` (main job on the embedded synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to a CPU build where one is provided locally; elsewhere to PyPI's 2.13.0.
TORCH_SPEC ?= torch==2.13.0

.PHONY: env demo test lint bench bench-gpu clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	-$(BIN)/pip install -q -c constraints.txt -e ".[fast]" || echo "optional fast paths (fpsample, faiss-cpu) not installed"
	touch $@

env: $(VENV)/.installed

demo: env
	$(BIN)/mmiad demo --out demo_out

test: env
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: env
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

bench: env
	$(BIN)/python -m mmiad.bench stages --out BENCHMARKS.md
	$(BIN)/python -m mmiad.bench accuracy --out BENCHMARKS.md

# Every method and preset on CUDA against the CPU (exits 3 without a GPU: CUDA untested; 1 on any disagreement).
# Without a GPU, exercise it with: make bench-gpu GPU_TARGET="--target-device cpu --target-precision bf16"
GPU_TARGET ?= --target-device cuda --target-precision fp32
bench-gpu: env
	$(BIN)/python -m mmiad.bench gpu $(GPU_TARGET) --out BENCHMARKS.md

clean:
	rm -rf demo_out .pytest_cache
