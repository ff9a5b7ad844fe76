# make test / make demo work on a fresh machine from a fresh clone:
# they create .venv, install the pinned dependencies and citer itself, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.citer-installed
# the oldest transformers pyproject allows, put in front of the pinned one for a second run
# (--no-deps: its other dependencies are the pinned venv's)
OLDEST := $(VENV)/oldest
# not run again there (about 2 of the suite's 4-6 minutes): the kernels, layers, threads and
# HTTP hardening use no transformers API; the Triton-engine and CUDA-graph tests check against
# the same transformers references the engine tests do; the benchmarks target the pinned version
OLDEST_SKIP := $(addprefix --ignore=tests/,test_kernels.py test_cuda_graph.py test_engine_triton.py \
	test_cpu_layer.py test_layers.py test_ops.py test_threads.py test_serve_hostile.py test_benchmarks.py)
export OMP_NUM_THREADS ?= 2

.PHONY: test test-pinned test-oldest demo install bench assets assets-free clean wheel-check

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

$(OLDEST)/.installed: requirements-oldest.txt $(STAMP)
	rm -rf $(OLDEST)
	$(PY) -m pip install -q --no-deps --target $(OLDEST) -r requirements-oldest.txt
	touch $@

test: test-pinned test-oldest

test-pinned: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-oldest: $(OLDEST)/.installed
	@PYTHONPATH=$(abspath $(OLDEST)) $(PY) -c "import transformers as t; print('again with transformers', t.__version__)"
	PYTHONPATH=$(abspath $(OLDEST)) $(PY) -m pytest -q -p no:cacheprovider tests $(OLDEST_SKIP)

demo: $(STAMP)
	$(PY) -m citer.demo

# Reproduce the embedded pairs from scratch (each about 35 minutes of model training plus
# 15-30 of router training on 2 CPU cores): the pair (Qwen2 architecture) trained on the
# task, the CITER router (hidden state + head signals), the CITER-S ablation and the
# query-level / Co-LLM baselines, then copy them into python/citer/assets/demo(_free).
# The arith pair also ships its hidden-only router (the paper's input) as router_hidden.
RUN := runs/demo
FREE := runs/free
ROUTER_ARGS := --n-train 4000 --n-val 400 --easy-keep 0.25
assets: $(STAMP)
	$(PY) -m citer.research.training.lm --out $(RUN) --only llm
	$(PY) -m citer.research.training.lm --out $(RUN) --only slm
	$(PY) -m citer.cli train-router --slm $(RUN)/slm --llm $(RUN)/llm --task arith --out $(RUN)/router $(ROUTER_ARGS)
	$(PY) -m citer.cli train-router --slm $(RUN)/slm --llm $(RUN)/llm --task arith --out $(RUN)/router_hidden --features hidden --n-train 3000 --n-val 500
	$(PY) -m citer.cli train-router --slm $(RUN)/slm --llm $(RUN)/llm --task arith --out $(RUN)/router_s --features hidden --short-term --n-train 3000 --n-val 500
	$(PY) -m citer.cli train-baselines --slm $(RUN)/slm --llm $(RUN)/llm --task arith --out $(RUN)/baselines --n-train 2000
	$(PY) -m citer.research.training.ship $(RUN)

assets-free: $(STAMP)
	$(PY) -m citer.research.training.lm --task arith-free --out $(FREE)
	$(PY) -m citer.cli train-router --slm $(FREE)/slm --llm $(FREE)/llm --task arith-free --out $(FREE)/router $(ROUTER_ARGS)
	$(PY) -m citer.cli train-router --slm $(FREE)/slm --llm $(FREE)/llm --task arith-free --out $(FREE)/router_s --short-term $(ROUTER_ARGS)
	$(PY) -m citer.cli train-baselines --slm $(FREE)/slm --llm $(FREE)/llm --task arith-free --out $(FREE)/baselines --n-train 2000
	$(PY) -m citer.research.training.ship $(FREE) --task arith-free

# the built wheel in a clean venv: `citer serve` names its extra without it, answers /health with it
wheel-check:
	.ci/wheel_check

bench: $(STAMP)
	$(PY) benchmarks/engine_vs_transformers.py

clean:
	rm -rf build *.egg-info python/citer/*.so
