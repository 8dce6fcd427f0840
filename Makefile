# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.rmt_fast_installed
SOURCES := $(shell find rmt_fast kernels csrc -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) 2>/dev/null) setup.py requirements-dev.txt

.PHONY: setup demo test lint check-wheel bench check-cuda-build gpu-check clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU torch from this machine's wheel unless a torch is already there; never a bare `torch`.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(PY) -m rmt_fast.demo

lint: setup
	$(VENV)/bin/ruff check .

# two pytest workers (pytest-xdist): 8 min instead of 15 on a 2-core AVX2 EPYC (2026-12-07)
test: lint
	$(PY) -m pytest -q -n 2
	bash scripts/check_wheel.sh $(PY)

# a wheel built from this checkout, installed into a fresh venv, run from outside the checkout
check-wheel: setup
	bash scripts/check_wheel.sh $(PY)

bench: setup
	$(PY) -m rmt_fast.cli bench --quick

# Full CUDAExtension build against the CUDA torch 2.14.1 (about 5.5 GB venv, a few minutes).
CUDA_VENV ?= /tmp/rmt_fast_cudavenv
check-cuda-build:
	test -x $(CUDA_VENV)/bin/python || python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q torch==2.14.1 setuptools ninja
	rm -rf /tmp/rmt_cuda_src && mkdir -p /tmp/rmt_cuda_src && git archive HEAD | tar -x -C /tmp/rmt_cuda_src
	cd /tmp/rmt_cuda_src && SP=$$($(CUDA_VENV)/bin/python -c "import site;print(site.getsitepackages()[0])") && \
	  CUDA_HOME=/usr/local/cuda CPATH=$$SP/nvidia/cu13/include RMT_FAST_BUILD_CUDA=1 RMT_FAST_REQUIRE_EXT=1 \
	  MAX_JOBS=2 TORCH_CUDA_ARCH_LIST="8.0;9.0" $(CUDA_VENV)/bin/python setup.py build_ext --inplace
	cd /tmp/rmt_cuda_src && $(CUDA_VENV)/bin/python -c "import torch, rmt_fast._C; \
	  print(torch._C._dispatch_dump('rmt_fast::assemble_segment'))"

# One-shot GPU check (scripts/gpu_check.py): on a CUDA machine with torch + triton, builds and
# installs rmt_fast with its CUDA extension into GPU_PY, checks and times it (<= 8 minutes);
# JSON + markdown under $OUT, else gpu_check_out/. Without CUDA: a CPU dry run at tiny sizes.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) scripts/gpu_check.py

clean:
	rm -rf build *.egg-info rmt_fast/_C*.so
