"""OpenAI wire formats: errors, and citer's deltas -> OpenAI responses and stream chunks.

Every choice and chunk carries citer's per-token provenance in an extension field,
`"citer": {"token_ids", "from_llm", "router_scores"}`, which OpenAI clients ignore;
`usage` gains `llm_tokens`. Request bodies are read in requests.py.
"""
import functools
import re
import time
from typing import Dict, List, Optional


class BadRequest(ValueError):
    """A 400: the message says what is wrong, param names the field (None: the body as a whole)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, param: Optional[str] = None, code: Optional[str] = None,
               kind: str = "invalid_request_error") -> dict:
    """OpenAI's error object; strings made encodable (a client's lone surrogates escaped)."""
    return {"error": {"message": _text(message), "type": kind, "param": _text(param), "code": code}}


def _text(s: Optional[str]) -> Optional[str]:
    return s if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")


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
    def entry(t, v):
        piece = _piece(tokenizer, t)
        return {"token": piece, "logprob": v, "bytes": token_bytes(tokenizer, t, piece)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def token_bytes(tokenizer, token_id: int, piece: str) -> List[int]:
    """The token's own UTF-8 bytes (OpenAI's `bytes`; piece: the token decoded alone). A token
    holding part of a character decodes alone to U+FFFD, so its bytes come from its vocabulary
    entry instead: a SentencePiece byte-fallback piece (<0xE4>) or a byte-level BPE token
    (GPT-2's alphabet)."""
    if "\ufffd" not in piece or tokenizer is None:
        return list(piece.encode())
    raw, byte_of = tokenizer.convert_ids_to_tokens(token_id), _byte_of()
    if (m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", raw)) is not None:
        return [int(m.group(1), 16)]
    if all(c in byte_of for c in raw):
        return [byte_of[c] for c in raw]
    return list(piece.encode())


@functools.lru_cache(maxsize=1)
def _byte_of() -> Dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte -> the byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def usage(prompt_tokens: int, outputs) -> dict:
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "llm_tokens": sum(sum(o.from_llm) for o in outputs)}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    return {"abort": "stop"}.get(reason, reason)


def now() -> int:
    return int(time.time())
