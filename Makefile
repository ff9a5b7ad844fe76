# make test / make demo work on a fresh machine from a fresh clone:
# they create .venv, install the pinned dependencies and citer itself, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.citer-installed
export OMP_NUM_THREADS ?= 2

.PHONY: test demo install bench assets clean

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

# Reproduce the embedded default from scratch (about 45 minutes on 2 CPU cores): the demo
# pair (Qwen2 architecture) trained on the arithmetic task, the CITER router and the
# CITER-S ablation router, then copy them into python/citer/assets/demo.
RUN := runs/demo
assets: $(STAMP)
	$(PY) -m citer.training.lm --out $(RUN) --only llm
	$(PY) -m citer.training.lm --out $(RUN) --only slm
	$(PY) -m citer.cli train-router --slm $(RUN)/slm --llm $(RUN)/llm --task arith --out $(RUN)/router
	$(PY) -m citer.cli train-router --slm $(RUN)/slm --llm $(RUN)/llm --task arith --out $(RUN)/router_s --short-term
	$(PY) -m citer.training.ship $(RUN)

bench: $(STAMP)
	$(PY) benchmarks/engine_vs_transformers.py

clean:
	rm -rf build *.egg-info python/citer/*.so
