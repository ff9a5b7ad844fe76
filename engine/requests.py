"""The checks of a request's prompt and params before it enters the engine (intake.Requests
calls them, with the policy's and the KV pool's, before any state changes)."""
from typing import List, Optional, Sequence as Seq, Union

import numpy as np

from .sampling_params import SamplingParams

Prompt = Union[str, Seq[int]]


def prompt_token_ids(prompt: Prompt, index: int, tokenizer, vocab_limit: int, max_model_len: int,
                     add_special_tokens: bool = True) -> List[int]:
    """A text or token-id prompt -> its token ids, checked. Token ids may come as a list
    or tuple of ints, or as a 1-D integer numpy array or torch tensor. add_special_tokens=False
    for text a chat template rendered (it holds its own BOS, as apply_chat_template's ids do)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompt {index} is text, but the model folders have no tokenizer; "
                             "pass token ids instead")
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
    else:
        ids = _token_id_list(prompt, index)
        bad = [t for t in ids if not 0 <= t < vocab_limit]
        if bad:
            raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab_limit}): {bad[:5]}")
    if not ids:
        raise ValueError(f"prompt {index} is empty")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt {index} has {len(ids)} tokens; max_model_len is {max_model_len} "
                         "(prompt plus at least one new token must fit)")
    return ids


def _token_id_list(prompt, index: int) -> List[int]:
    if prompt is None:
        raise ValueError(f"prompt {index} is None; pass a string or a list of int token ids")
    if isinstance(prompt, (bytes, bytearray)):
        raise ValueError(f"prompt {index} is bytes; decode it to a str first (or pass a list of int token ids)")
    if hasattr(prompt, "dtype") and hasattr(prompt, "shape"):  # a numpy array or a torch tensor
        kind = getattr(prompt.dtype, "kind", None)  # numpy
        is_int = kind in ("i", "u") if kind is not None else not (prompt.dtype.is_floating_point or
                                                                    prompt.dtype.is_complex or
                                                                    str(prompt.dtype) == "torch.bool")
        if len(prompt.shape) != 1 or not is_int:
            raise ValueError(f"prompt {index} is a {type(prompt).__name__} of shape {tuple(prompt.shape)} and "
                             f"dtype {prompt.dtype}; token ids must be a 1-D integer array")
        return [int(t) for t in prompt.tolist()]
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt {index} must be a string or a list of int token ids, got {type(prompt).__name__}")
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in prompt):
        raise ValueError(f"prompt {index} must be a string or a list of int token ids")
    return [int(t) for t in prompt]


def check_params(params) -> SamplingParams:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    return params
