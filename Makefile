# make test / make demo work on a fresh machine from a fresh clone:
# they create .venv, install the pinned dependencies and citer itself, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.citer-installed
export OMP_NUM_THREADS ?= 2

.PHONY: test demo install bench clean

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(PY) -m citer.demo

bench: $(STAMP)
	$(PY) benchmarks/engine_vs_transformers.py

clean:
	rm -rf build *.egg-info python/citer/*.so
