"""What generate / stream return."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: Optional[str]  # None when the engine has no tokenizer
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | None while running
    from_llm: List[bool]  # per generated token: True if the LLM made it
    router_scores: List[Optional[float]]  # per generated token; None where no router ran
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def llm_share(self) -> float:
        return sum(self.from_llm) / len(self.from_llm) if self.from_llm else 0.0


@dataclass
class TokenEvent:
    """One decided token, as stream() yields it."""

    request_id: str
    token_id: int
    text: str  # the text delta this token adds (may be "" while a character is incomplete)
    from_llm: bool
    router_score: Optional[float]
    finish_reason: Optional[str] = None
    output: Optional[RequestOutput] = None  # the whole request's output, on its last event
