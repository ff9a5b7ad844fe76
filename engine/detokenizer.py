"""Incremental detokenization with stop strings (vLLM's prefix / read offsets).

Each committed token is decoded in a window: the text of tokens[prefix_offset:] minus
that of tokens[prefix_offset:read_offset] is what the new tokens add (the earlier tokens
give the tokenizer its context, e.g. a leading space). A window whose text ends in an
incomplete UTF-8 character ("\\ufffd") waits for more tokens. Work per token is bounded
by the window, not by the output so far.

The visible text only ever grows, so streamed deltas join to generate's text: while a
request runs, the last (longest stop string - 1) characters are held back (a stop string
may still be completing across tokens) and released when the request finishes. A stop
string cuts the text before it (after it with include_stop_str_in_output), and so does a
stop token (EOS, stop_token_ids): its own text is left out unless asked for. Stop strings
are matched on the text as decoded with the request's skip_special_tokens (default
True: special tokens such as <|im_end|> never appear in it, so a stop string naming one
never fires; use stop_token_ids for those).
"""
from dataclasses import dataclass
from typing import Tuple

from .sequence import Sequence


@dataclass
class DetokState:
    prefix_offset: int = 0  # output tokens before this are no longer decoded
    read_offset: int = 0  # output tokens before this have their text in `full`
    full: str = ""  # all the output text decoded so far (nothing held back, nothing cut)
    searched: int = 0  # `full` before this has been searched for stop strings


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, seq: Sequence, upto: int, finishing: bool, stop_strings: bool = True) -> Tuple[str, bool]:
        """The output tokens up to position upto (committed ones) -> (text delta, hit a
        stop string). stop_strings=False: not yet (a request under its min_tokens: a stop
        string that ends in the text of its first min_tokens tokens never stops it)."""
        if self.tokenizer is None:
            return "", False
        st = seq.detok
        if st is None:
            st = seq.detok = DetokState()
        tokens = seq.token_ids[seq.num_prompt_tokens:upto]
        skip = seq.params.skip_special_tokens
        prefix = self.tokenizer.decode(tokens[st.prefix_offset:st.read_offset], skip_special_tokens=skip)
        window = self.tokenizer.decode(tokens[st.prefix_offset:], skip_special_tokens=skip)
        if len(window) > len(prefix) and (finishing or not window.endswith("\ufffd")):
            st.full += window[len(prefix):]
            st.prefix_offset, st.read_offset = st.read_offset, len(tokens)
        stops = seq.params.stop_list
        hit = None
        if stop_strings and stops:
            for s in stops:  # the matches that end in the new text (one may straddle the last search's end)
                idx = st.full.find(s, max(st.searched - len(s) + 1, 0))
                if idx != -1 and (hit is None or idx < hit[0]):
                    hit = (idx, s)
        st.searched = len(st.full)  # text made under min_tokens is never searched (vLLM's rule too)
        if hit is not None:
            visible = st.full[:hit[0] + (len(hit[1]) if seq.params.include_stop_str_in_output else 0)]
        elif finishing:
            visible = st.full
        else:
            hold = max((len(s) for s in stops), default=1) - 1
            visible = st.full[:len(st.full) - hold] if hold else st.full
        if len(visible) <= len(seq.text):
            return "", hit is not None
        delta = visible[len(seq.text):]
        seq.text = visible
        return delta, hit is not None
