"""citer: token-level collaborative decoding between a small and a large language model."""
from .api import Calibration, Engine
from .outputs import RequestOutput, TokenEvent
from .sampling_params import POLICIES, SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput", "TokenEvent", "Calibration", "POLICIES"]
