# The whole set-up on a fresh machine is one of these two commands:
#   make demo   -> installs everything pinned into .venv, then runs the 2D toy demo (`vefast toy`)
#   make test   -> installs the same, builds the CUDA extension, runs the CPU test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CI may build one architecture only: VEFAST_CUDA_ARCHS=90 make test
export VEFAST_CUDA_ARCHS ?= 80;90
SOURCES := $(wildcard setup.py pyproject.toml csrc/*.cpp csrc/*.h kernels/*.cu kernels/*.cuh)

.PHONY: demo test test-lowest test-gpu bench-cpu bench-gpu gpu-check info clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Editable install: builds vefast._C in place whenever nvcc is found (ninja rebuilds what changed).
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vefast toy $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/vefast info
	$(PY) -m pytest -q -m "not gpu" $(ARGS)

# `pip install vefast` on the lowest supported torch: a fresh venv, vefast from its pure-Python wheel, the smoke
# tests (.ci/smoke_tests.txt). Downloads that torch (~2.5 GB with its CUDA libraries); see .ci/lowest_torch.sh.
test-lowest: $(VENV)/.deps
	BUILD_PYTHON=$(abspath $(PY)) bash .ci/lowest_torch.sh

# On a machine with a GPU: the gpu lane, compute-sanitizer and the benchmarks (benchmarks/gpu_check.sh).
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu_lane $(ARGS)

bench-cpu: $(VENV)/.installed
	$(PY) -m pytest -q benchmarks --benchmark-enable $(ARGS)

bench-gpu: $(VENV)/.installed
	$(PY) -m benchmarks.run_gpu $(ARGS)

# The one GPU call's script (docs/speed_checks.md); ARGS=--dry-run checks it here, without a GPU.
gpu-check: $(VENV)/.installed
	PYTHON=$(PY) bash benchmarks/gpu_check.sh $(ARGS)

# Codegen gate, full set: every Triton kernel config compiled for sm_90 / sm_80, no spills (docs/speed_checks.md);
# writes the committed table. `make test` runs its representative subset (tests/test_codegen.py).
.PHONY: codegen
codegen: $(VENV)/.installed
	$(PY) -m benchmarks.codegen --full --json benchmarks/results/codegen_cpu.json $(ARGS)

info: $(VENV)/.installed
	$(VENV)/bin/vefast info

clean:
	rm -rf build vefast/_C*.so vefast/_build_info.json *.egg-info
