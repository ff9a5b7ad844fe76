"""What generate / stream / step return, and the LLM-share count every report uses."""
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model that made it (raw logits, before
    temperature or filters), and that model's most likely tokens there."""

    token_id: int
    logprob: float
    top: List[Tuple[int, float]]  # (token id, logprob), most likely first; SamplingParams.logprobs of them

    @classmethod
    def from_row(cls, row, token: int, k: int) -> "TokenLogprob":
        """row: log-softmax [V] (any device)."""
        values, ids = row.topk(k) if k else (row[:0], row[:0].long())
        return cls(int(token), float(row[token]), list(zip(ids.tolist(), values.tolist())))


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: Optional[str]  # None when the engine has no tokenizer
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | "error" | None while running
    from_llm: List[bool]  # per generated token: True if the LLM made it
    router_scores: List[Optional[float]]  # per generated token; None where no router ran
    stats: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None  # finish_reason "error": what failed
    logprobs: Optional[List[TokenLogprob]] = None  # per generated token, when SamplingParams.logprobs is set
    index: int = 0  # which of the prompt's SamplingParams.n samples this is

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def llm_share(self) -> float:
        return llm_share([self])


@dataclass
class TokenEvent:
    """One decided token, as stream() and step() give it; a request's last event carries its
    output. A request that ends without a new token (aborted, or failed in a step) ends
    with an event whose token_id is None and text "" (finish_reason "abort" / "error")."""

    request_id: str
    token_id: Optional[int]
    text: str  # the text delta this token adds (may be "" while a character is incomplete)
    from_llm: bool
    router_score: Optional[float]
    finish_reason: Optional[str] = None
    output: Optional[RequestOutput] = None  # the whole request's output, on its last event
    logprob: Optional[TokenLogprob] = None  # when SamplingParams.logprobs is set


def llm_share(outputs: Iterable[RequestOutput]) -> float:
    """Share of all generated tokens of these outputs that the LLM made (0 when none)."""
    made = total = 0
    for o in outputs:
        made += sum(o.from_llm)
        total += len(o.from_llm)
    return made / total if total else 0.0


def request_output(seq, with_text: bool, profiled: bool = False) -> RequestOutput:
    """A sequence's output: exactly the tokens its owner was sent as events (committed
    ones; tentative tokens are not an output yet, nor tokens of a step that failed before
    their events), and its stats, with the shares and rates derived from them."""
    n = seq.emitted - seq.num_prompt_tokens
    out = RequestOutput(
        request_id=seq.request_id,
        prompt_token_ids=list(seq.prompt_token_ids),
        token_ids=seq.token_ids[seq.num_prompt_tokens:seq.emitted],
        text=seq.text if with_text else None,
        finish_reason=seq.finish_reason,
        from_llm=seq.from_llm[:n],
        router_scores=seq.router_scores[:n],
        stats=seq.stats.as_dict(seq.policy, profiled),
        logprobs=seq.logprobs[:n] if seq.params.logprobs is not None else None,
        index=seq.index,
    )
    out.stats["llm_tokens"] = sum(out.from_llm)
    out.stats["llm_share"] = llm_share([out])
    out.stats["llm_calls_per_token"] = out.stats["llm_calls"] / max(n, 1)
    if "drafted" in out.stats:  # policy "speculative"
        out.stats["acceptance_rate"] = out.stats["accepted"] / max(out.stats["drafted"], 1)
    return out
