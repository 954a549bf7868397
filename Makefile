# The whole set-up on a fresh machine is one of these two commands:
#   make demo   -> installs everything pinned into .venv, then runs the 2D toy demo (`vefast toy`)
#   make test   -> installs the same, builds the CUDA extension, runs the CPU test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CI may build one architecture only: VEFAST_CUDA_ARCHS=90 make test
export VEFAST_CUDA_ARCHS ?= 80;90
SOURCES := $(wildcard setup.py pyproject.toml csrc/*.cpp csrc/*.h kernels/*.cu kernels/*.cuh)

.PHONY: demo test test-gpu bench-cpu bench-gpu gpu-check info clean

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

# On a machine with a GPU: the gpu lane, compute-sanitizer and the benchmarks (benchmarks/gpu_check.sh).
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu $(ARGS)

bench-cpu: $(VENV)/.installed
	$(PY) -m pytest -q benchmarks --benchmark-enable $(ARGS)

bench-gpu: $(VENV)/.installed
	$(PY) -m benchmarks.run_gpu $(ARGS)

info: $(VENV)/.installed
	$(VENV)/bin/vefast info

clean:
	rm -rf build vefast/_C*.so vefast/_build_info.json *.egg-info
