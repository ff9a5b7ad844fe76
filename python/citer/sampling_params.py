"""Kept for old imports: SamplingParams lives in citer.engine.sampling_params."""
from citer.engine.sampling_params import POLICIES, SamplingParams

__all__ = ["POLICIES", "SamplingParams"]
