"""Incremental detokenization with stop strings.

The visible text only ever grows, so streamed deltas join to generate's text: while a
request runs, the last (longest stop string - 1) characters and any incomplete UTF-8
character are held back; they are released when the request finishes.
"""
from typing import Tuple

from .sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, seq: Sequence, upto: int, finishing: bool) -> Tuple[str, bool]:
        """Recompute seq.text for the tokens before position upto (committed ones) ->
        (text delta, hit a stop string)."""
        if self.tokenizer is None:
            return "", False
        full = self.tokenizer.decode(seq.token_ids[seq.num_prompt_tokens:upto], skip_special_tokens=True)
        stops = seq.params.stop_list
        hit = None
        for s in stops:
            idx = full.find(s)
            if idx != -1 and (hit is None or idx < hit):
                hit = idx
        if hit is not None:
            visible = full[:hit]
        elif finishing:
            visible = full
        else:
            hold = max((len(s) for s in stops), default=1) - 1
            visible = full[: len(full) - hold] if hold else full
            if visible.endswith("\ufffd"):
                visible = visible.rstrip("\ufffd")
        if not visible.startswith(seq.text):  # a tokenizer re-spaced earlier text: keep what was sent
            return "", hit is not None
        delta = visible[len(seq.text):]
        seq.text = visible
        return delta, hit is not None
