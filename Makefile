# Every target creates .venv first when it is missing (SPEC §2).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup bytecode test demo bench bench-gpu gpu-wheels mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# aver's bytecode, written even where PYTHONDONTWRITEBYTECODE is set (this machine, CI): without it
# every process a run starts (~500 in the suite: Ray workers, actors, jobs) compiles aver again.
bytecode: setup
	$(PY) -m compileall -q aver tests

test: bytecode
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: bytecode
	$(PY) jobs/demo.py --output outputs/demo

bench: bytecode
	$(PY) jobs/bench.py

# The GPU figures, on the stage code without Ray (jobs/bench_gpu.py). Here (no CUDA): small sizes on
# the CPU, about a minute. On the GPU machine (no registry, no Ray) it runs from the wheels that
# `make gpu-wheels` puts in gpu-wheels/ (docs/benchmarks.md says how); it needs no venv there.
bench-gpu: setup
	$(PY) jobs/bench_gpu.py --out $${OUT:-bench-gpu-out}

# cp312 wheels of what the GPU machine lacks and the stages import (PyAV, facenet-pytorch, fsspec)
# to carry there beside the checkout (under 40 MiB).
gpu-wheels: setup
	rm -rf gpu-wheels
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d gpu-wheels \
	    av==18.1.0 facenet-pytorch==2.5.3 fsspec==2026.9.0

mutate: setup
	$(PY) tests/mutation.py

clean:
	rm -rf $(VENV) outputs .pytest_cache bench-gpu-out gpu-wheels
