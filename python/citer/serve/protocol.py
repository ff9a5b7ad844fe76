"""OpenAI request bodies -> (prompt, SamplingParams); citer's deltas -> OpenAI responses.

Routing controls ride along as extra body fields (policy, threshold, llm_fraction,
confidence_threshold, verify, num_draft_tokens, draft_confidence), as do vLLM's sampling
extras (top_k, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens,
include_stop_str_in_output). Every choice and chunk carries citer's per-token
provenance in an extension field, `"citer": {"token_ids", "from_llm", "router_scores"}`,
which OpenAI clients ignore; `usage` gains `llm_tokens`. A field citer does not support
gets a 400 naming it, never a silent ignore.
"""
import time
from typing import Any, Dict, List, Optional, Tuple

from citer.engine.sampling_params import SamplingParams

ROUTING = ("policy", "threshold", "llm_fraction", "confidence_threshold", "verify", "num_draft_tokens",
           "draft_confidence")
EXTRAS = ("top_k", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output")
COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user")
COMPLETION_FIELDS = set(COMMON + ROUTING + EXTRAS + ("prompt", "logprobs", "echo", "best_of", "suffix",
                                                     "presence_penalty", "frequency_penalty", "logit_bias"))
CHAT_FIELDS = set(COMMON + ROUTING + EXTRAS + ("messages", "logprobs", "top_logprobs", "max_completion_tokens",
                                               "presence_penalty", "frequency_penalty", "logit_bias", "tools",
                                               "tool_choice", "response_format"))
# fields accepted only at their no-op value
NO_OP = {"echo": (False, None), "best_of": (None, 1), "suffix": (None,), "presence_penalty": (0, 0.0, None),
         "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
         "response_format": (None, {"type": "text"})}


class BadRequest(ValueError):
    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, param: Optional[str] = None, code: Optional[str] = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _check_fields(body: Dict[str, Any], allowed: set) -> None:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key, value in body.items():
        if key not in allowed:
            raise BadRequest(f"unsupported field {key!r}", param=key, code="unsupported_parameter")
        if key in NO_OP and value not in NO_OP[key]:
            raise BadRequest(f"{key}={value!r} is not supported by citer", param=key, code="unsupported_parameter")


def sampling_params(body: Dict[str, Any], logprobs: Optional[int]) -> SamplingParams:
    """OpenAI defaults (temperature 1, max_tokens 16), vLLM / citer extras."""
    kw = {k: body[k] for k in ROUTING + EXTRAS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    try:
        return SamplingParams(max_tokens=16 if max_tokens is None else max_tokens,
                              temperature=1.0 if body.get("temperature") is None else body["temperature"],
                              top_p=1.0 if body.get("top_p") is None else body["top_p"],
                              n=1 if body.get("n") is None else body["n"], seed=body.get("seed"), stop=stop,
                              logprobs=logprobs, **kw)
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e).removeprefix("invalid SamplingParams: ")) from e


def completion_request(body: Dict[str, Any]) -> Tuple[list, SamplingParams]:
    """-> (prompts: strings or token-id lists, params)."""
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("prompt must be a string, a list of token ids, or a list of those", param="prompt")
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)):
        raise BadRequest("logprobs must be an int (completions: the top-k alternatives to report)", param="logprobs")
    return prompts, sampling_params(body, lp)


def chat_request(body: Dict[str, Any], tokenizer) -> Tuple[str, SamplingParams]:
    _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRequest("messages must be a non-empty list of {role, content} objects with string content",
                         param="messages")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model has no chat template; use /v1/completions", param="messages",
                         code="no_chat_template")
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    logprobs = None
    if body.get("logprobs"):
        logprobs = body.get("top_logprobs") or 0
    return prompt, sampling_params(body, logprobs)


# ---- responses ---------------------------------------------------------------------------
def provenance(token_ids: List[int], from_llm: List[bool], router_scores: List[Optional[float]]) -> dict:
    return {"token_ids": list(token_ids), "from_llm": list(from_llm), "router_scores": list(router_scores)}


def completion_logprobs(tokenizer, logprobs, offset: int = 0) -> Optional[dict]:
    if logprobs is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        piece = _piece(tokenizer, lp.token_id)
        out["tokens"].append(piece)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({_piece(tokenizer, t): v for t, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(tokenizer, logprobs) -> Optional[dict]:
    if logprobs is None:
        return None
    entry = lambda t, v: {"token": _piece(tokenizer, t), "logprob": v,  # noqa: E731
                          "bytes": list(_piece(tokenizer, t).encode())}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def usage(prompt_tokens: int, outputs) -> dict:
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "llm_tokens": sum(sum(o.from_llm) for o in outputs)}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    return {"abort": "stop"}.get(reason, reason)


def now() -> int:
    return int(time.time())
