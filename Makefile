# One-command entry points. Both work on a fresh machine with Python 3.11 and no GPU:
#   make demo   - the main job: GRPO on the embedded tiny model (CPU, local Ray)
#   make test   - the CPU test suite (GPU tests are skipped without CUDA)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-long test-gpu
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,eval]"
	touch $@

# runs/demo is the demo's own scratch directory: each `make demo` starts it over (--overwrite deletes the
# demo's own files there, nothing else). DEMO_ARGS adds arguments, e.g. DEMO_ARGS="--steps 5".
demo: install
	$(BIN)/bitmamba demo --output-dir runs/demo --overwrite $(DEMO_ARGS)

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests -m "not long"

# the long end-to-end tests (README and docs recipes as written, kill-and-resume, multi-rank, clusters)
test-long: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests -m long

# the GPU tests, on a CUDA machine (skipped without one)
test-gpu: install
	$(BIN)/python -m pytest -q tests -m gpu
