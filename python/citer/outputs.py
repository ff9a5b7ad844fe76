"""Kept for old imports: the output types live in citer.engine.outputs."""
from citer.engine.outputs import RequestOutput, TokenEvent, llm_share

__all__ = ["RequestOutput", "TokenEvent", "llm_share"]
