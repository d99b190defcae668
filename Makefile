# Every target creates .venv first when it is missing (SPEC §2).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: setup
	$(PY) jobs/demo.py --output outputs/demo

bench: setup
	$(PY) jobs/bench.py

mutate: setup
	$(PY) tests/mutation.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
