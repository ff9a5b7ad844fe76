"""OpenAI request bodies -> (prompts or messages, SamplingParams), refusing anything
malformed with a 400 that names the field (BadRequest.param), before any heavy work.

- Standard JSON only, read by `parse_body`: one object, UTF-8, no NaN / Infinity
  literals, no repeated field, no lone surrogate escapes; each field's value parsed on
  its own, so that an error (nesting too deep, a bad literal, an int of 5,000 digits)
  names the field it is in.
- Strict types: booleans are true / false (never "false" or 0), numbers finite, ints
  ints; `stream_options` an object.
- The server's limits (Limits): prompts per request, n, characters per prompt (checked
  before tokenizing) and token-id prompts shorter than max_model_len.
Tokenizing and rendering chat templates are left to the caller (off the event loop and
off the engine's thread).
"""
import json
import math
import re
import reprlib
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any, Dict, List, Tuple

from citer.engine.sampling_params import SamplingParams

from .protocol import BadRequest

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
         "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}), "tools": (None, []),
         "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}
BOOLS = ("stream", "echo", "ignore_eos", "verify", "skip_special_tokens", "include_stop_str_in_output")
INTS = ("max_tokens", "max_completion_tokens", "n", "seed", "top_k", "min_tokens", "num_draft_tokens", "best_of",
        "top_logprobs")
NUMBERS = ("temperature", "top_p", "threshold", "llm_fraction", "confidence_threshold", "draft_confidence",
           "presence_penalty", "frequency_penalty")
STRINGS = ("model", "user", "policy", "suffix")
OBJECTS = ("stream_options", "logit_bias", "response_format")
STREAM_OPTIONS = {"include_usage": bool}

_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxlist, _short.maxdict = 60, 60, 2, 4, 4


@dataclass
class Limits:
    max_prompts: int
    max_n: int
    max_prompt_chars: int
    max_model_len: int


def short(value: Any) -> str:
    """A bounded repr of a client's value, safe to encode (for error messages)."""
    return _short.repr(value).encode("utf-8", "backslashreplace").decode("utf-8")


# ---- standard JSON, field by field -------------------------------------------------------
def _no_constant(name: str):
    raise ValueError(f"{name} is not standard JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def parse_body(raw: bytes) -> Dict[str, Any]:
    """The body as a dict of fields (see the module docstring for what is refused)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8: {e}") from None
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    i = _WS.match(text).end()
    if text[i:i + 1] != "{":
        raise BadRequest("the request body must be a JSON object" if text.strip() else "the request body is empty")
    body: Dict[str, Any] = {}
    i = _WS.match(text, i + 1).end()
    if text[i:i + 1] == "}":
        return _end(text, i + 1, body)
    while True:
        if text[i:i + 1] != '"':
            raise _invalid(f"expected a field name in double quotes at position {i}")
        try:
            key, i = scanstring(text, i + 1)
        except ValueError as e:
            raise _invalid(str(e)) from None
        if surrogates and not _encodable(key):
            raise BadRequest(f"field name {short(key)} is not valid Unicode (a lone surrogate)", param=short(key)[1:-1])
        i = _WS.match(text, i).end()
        if text[i:i + 1] != ":":
            raise _invalid(f"expected ':' after field {short(key)} at position {i}", key)
        i = _WS.match(text, i + 1).end()
        try:
            value, i = _DECODER.raw_decode(text, i)
        except RecursionError:
            raise BadRequest(f"field {short(key)} is nested too deeply", param=key) from None
        except ValueError as e:  # JSONDecodeError, NaN / Infinity, ints past Python's digit limit
            raise _invalid(f"{e} (in field {short(key)})", key) from None
        if key in body:
            raise BadRequest(f"field {short(key)} appears more than once", param=key)
        if surrogates and not _encodable(value):
            raise BadRequest(f"field {short(key)} holds a string that is not valid Unicode (a lone surrogate)",
                             param=key)
        body[key] = value
        i = _WS.match(text, i).end()
        c = text[i:i + 1]
        if c == "}":
            return _end(text, i + 1, body)
        if c != ",":
            raise _invalid(f"expected ',' or '}}' after field {short(key)} at position {i}", key)
        i = _WS.match(text, i + 1).end()


def _end(text: str, i: int, body: dict) -> dict:
    if _WS.match(text, i).end() != len(text):
        raise _invalid(f"extra data after the JSON object at position {i}")
    return body


def _invalid(message: str, param=None) -> BadRequest:
    return BadRequest(f"the request body is not valid JSON: {message}", param=param)


def _encodable(value) -> bool:
    """No lone surrogate anywhere in value (iteratively: values may be deep)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
    return True


# ---- fields ------------------------------------------------------------------------------
def check_model(body: Dict[str, Any], served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise BadRequest(f"model {short(model)} is not served here; this server serves {served!r}", param="model",
                         code="model_not_found")


def _check_fields(body: Dict[str, Any], allowed: set, limits: Limits) -> None:
    for key, value in body.items():
        if key not in allowed:
            raise BadRequest(f"unsupported field {short(key)}", param=key, code="unsupported_parameter")
        if value is None:
            continue
        _check_type(key, value)
        if key in NO_OP and value not in NO_OP[key]:
            raise BadRequest(f"{key}={short(value)} is not supported by citer", param=key, code="unsupported_parameter")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise BadRequest("stream_options is only allowed with stream: true", param="stream_options")
    if body.get("n") is not None and body["n"] > limits.max_n:
        raise BadRequest(f"n is {body['n']}; this server takes at most {limits.max_n} (--max-n)", param="n")


def _check_type(key: str, value: Any) -> None:
    def need(ok: bool, what: str):
        if not ok:
            raise BadRequest(f"{key} must be {what}, got {short(value)}", param=key, code="invalid_type")

    if key in BOOLS:
        need(isinstance(value, bool), "true or false")
    elif key in INTS:  # within 64 bits (seeds unsigned)
        top = 2**64 if key == "seed" else 2**63
        need(isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < top, "a 64-bit integer")
    elif key in NUMBERS:
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value), "a finite number")
    elif key in STRINGS:
        need(isinstance(value, str), "a string")
    elif key in OBJECTS:
        need(isinstance(value, dict), "an object")
    elif key == "stop":
        need(isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)),
             "a string or a list of strings")
    elif key == "stop_token_ids":
        need(isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value),
             "a list of token ids")
    if key == "stream_options":
        for name, v in value.items():
            if name not in STREAM_OPTIONS:
                raise BadRequest(f"unsupported field stream_options.{short(name)}", param=f"stream_options.{name}",
                                 code="unsupported_parameter")
            if v is not None and not isinstance(v, STREAM_OPTIONS[name]):
                raise BadRequest(f"stream_options.{name} must be true or false, got {short(v)}",
                                 param=f"stream_options.{name}", code="invalid_type")


def sampling_params(body: Dict[str, Any], logprobs) -> SamplingParams:
    """OpenAI defaults (temperature 1, max_tokens 16), vLLM / citer extras."""
    kw = {k: body[k] for k in ROUTING + EXTRAS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens")  # the newer name wins; null is as if absent
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    try:
        return SamplingParams(max_tokens=16 if max_tokens is None else max_tokens,
                              temperature=1.0 if body.get("temperature") is None else body["temperature"],
                              top_p=1.0 if body.get("top_p") is None else body["top_p"],
                              n=1 if body.get("n") is None else body["n"], seed=body.get("seed"),
                              stop=body.get("stop"), logprobs=logprobs, **kw)
    except (ValueError, TypeError) as e:
        message = str(e).removeprefix("invalid SamplingParams: ")
        raise BadRequest(message[:500], param=param_named(message, body)) from None


def param_named(message: str, body: Dict[str, Any], default=None):
    """The body field an engine message is about: the first field it names."""
    names = {"max_tokens": "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"}
    for word in re.findall(r"[a-z_]+", message):
        if word in body or word in names:
            return names.get(word, word)
    return default


# ---- the two endpoints ---------------------------------------------------------------------
def completion_request(body: Dict[str, Any], limits: Limits) -> Tuple[list, SamplingParams]:
    """-> (prompts: strings or token-id lists, params)."""
    _check_fields(body, COMPLETION_FIELDS, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("prompt must be a string, a list of token ids, or a list of those", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise BadRequest(f"prompt holds {len(prompts)} prompts; this server takes at most {limits.max_prompts} per "
                         "request (--max-prompts)", param="prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if len(p) > limits.max_prompt_chars:
                raise BadRequest(f"prompt {i} has {len(p)} characters; this server takes at most "
                                 f"{limits.max_prompt_chars} (--max-prompt-chars)", param="prompt")
        elif not all(_is_id(t) for t in p):
            raise BadRequest(f"prompt {i} must be a string or a list of token ids", param="prompt")
        elif len(p) >= limits.max_model_len:
            raise BadRequest(f"prompt {i} has {len(p)} tokens; max_model_len is {limits.max_model_len} "
                             "(prompt plus at least one new token must fit)", param="prompt")
    lp = body.get("logprobs")
    if lp is not None and not (isinstance(lp, int) and not isinstance(lp, bool)):
        raise BadRequest("logprobs must be an int (completions: the top-k alternatives to report)", param="logprobs")
    return prompts, sampling_params(body, lp)


def chat_request(body: Dict[str, Any], limits: Limits, tokenizer) -> Tuple[List[dict], SamplingParams]:
    """-> (messages, params); the caller renders the chat template."""
    _check_fields(body, CHAT_FIELDS, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise BadRequest("messages must be a non-empty list of {role, content} objects", param="messages")
    messages = [{**m, "content": _content_text(m.get("content"), i)} for i, m in enumerate(messages)]
    chars = sum(len(m["content"]) for m in messages)
    if chars > limits.max_prompt_chars:
        raise BadRequest(f"messages hold {chars} characters; this server takes at most {limits.max_prompt_chars} "
                         "(--max-prompt-chars)", param="messages")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model has no chat template; use /v1/completions", param="messages",
                         code="no_chat_template")
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise BadRequest(f"logprobs must be true or false, got {short(lp)}", param="logprobs", code="invalid_type")
    top = body.get("top_logprobs")
    if top is not None and top != 0 and not lp:  # as vLLM: 0 asks for nothing
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    try:
        return messages, sampling_params(body, (top or 0) if lp else None)
    except BadRequest as e:
        if e.param != "logprobs" or top is None:
            raise
        raise BadRequest(str(e).replace("logprobs", "top_logprobs", 1), param="top_logprobs") from None


def _content_text(content, index: int) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...},
    as OpenAI's clients send them), joined with newlines as vLLM joins them."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content} - {"text"}
        if kinds:
            raise BadRequest(f"messages[{index}].content: only text parts are served here, got types "
                             f"{short(sorted(map(str, kinds)))}", param=f"messages[{index}].content",
                             code="unsupported_content")
        if all(isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts, got {short(content)}",
                     param=f"messages[{index}].content")


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int past float's range
        return False


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)
