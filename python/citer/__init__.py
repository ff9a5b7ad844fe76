"""citer: token-level collaborative decoding between a small and a large language model.

Where the code lives (setup.py maps three source folders into this one package):

    import path          source folder     what
    citer                python/citer/     the API (Engine), builder, models, router,
                                           tasks, training, evaluation, CLI, demo assets
    citer.engine         engine/           the runtime: requests, scheduler, model
                                           runners, routing, CUDA graphs, step loop
    citer.kernels        kernels/          the ops: Triton kernels and torch references
    citer._C             csrc/             the C++ page (KV block) manager

Imports go one way: citer -> citer.engine -> citer.models -> citer.kernels
(the engine never imports the API modules; the kernels import nothing of citer).
"""
from citer.engine.outputs import RequestOutput, TokenEvent
from citer.engine.sampling_params import POLICIES, SamplingParams

from .api import Calibration, Engine

__all__ = ["Engine", "SamplingParams", "RequestOutput", "TokenEvent", "Calibration", "POLICIES"]
