# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.rmt_fast_installed
SOURCES := $(shell find rmt_fast kernels csrc -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) 2>/dev/null) setup.py requirements-dev.txt

.PHONY: setup demo test lint bench check-cuda-build clean

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

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) -m rmt_fast.cli bench --quick

clean:
	rm -rf build *.egg-info rmt_fast/_C*.so
