"""citer: token-level collaborative decoding between a small and a large language model.

Where the code lives (setup.py maps three source folders into this one package), in
layers, each importing only the layers below it:

    import path            source folder          what
    citer                  python/citer/          the API: Engine, EngineArgs, AsyncEngine,
                                                  the builder, CLI, server, demo assets
    citer.research         python/citer/research/ router training, tasks and checkers,
                                                  evaluation, baselines (uses the API)
    citer.engine           engine/                the runtime: requests, scheduler, policies,
                                                  model runners, CUDA graphs, step loop
    citer.engine.models    engine/models/         model definitions, checkpoint loading,
                                                  the router's inference form
    citer.kernels          kernels/               the ops: Triton kernels, torch references
    citer._C               csrc/                  the C++ page (KV block) manager

Imports point down only: citer.research -> citer -> citer.engine -> citer.engine.models
-> citer.kernels (tests/test_layers.py checks it). This module imports nothing until a
name is asked for, so `import citer.kernels` loads the kernels alone.
"""
import importlib

_EXPORTS = {
    "Engine": "citer.api",
    "Calibration": "citer.api",
    "EngineArgs": "citer.engine.args",
    "AsyncEngine": "citer.async_engine",
    "SamplingParams": "citer.engine.sampling_params",
    "POLICIES": "citer.engine.sampling_params",
    "RequestOutput": "citer.engine.outputs",
    "TokenEvent": "citer.engine.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'citer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
