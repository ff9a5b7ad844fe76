"""Requests: how requests come into the engine and leave it.

Every check a request gets (in one place, before any state changes), its policy, ids
that never collide, the n samples of one prompt, who owns each request's events (the
inbox), the outputs their owners receive, and abort. The core (core.py) owns one and
asks it; the step loop itself is the core's.
"""
import itertools
from dataclasses import replace
from typing import Dict, Hashable, List, Optional

import numpy as np

from .inbox import STEP_API, Inbox
from .outputs import RequestOutput, TokenEvent, request_output
from .policies import make_policy
from .requests import Prompt, check_params, prompt_token_ids
from .sequence import Sequence


class Requests:
    def __init__(self, config, scheduler, tokenizer, vocab_limit: int, has_slm: bool, has_llm: bool):
        self.config, self.scheduler = config, scheduler
        self.tokenizer, self.vocab_limit = tokenizer, vocab_limit
        self.has_slm, self.has_llm = has_slm, has_llm
        self.inbox = Inbox()
        self.groups: Dict[str, List[str]] = {}  # request id -> its samples' ids (SamplingParams.n > 1)
        self._rng = np.random.default_rng(config.seed)  # seeds of requests that bring none
        self._ids = itertools.count()

    def make_sequences(self, prompt: Prompt, params, router, index: int = 0,
                       request_id: Optional[str] = None) -> List[Sequence]:
        """Every check a request gets, in one place; -> its Sequences: one, or with
        params.n > 1 one per sample (ids "<id>#<i>", seeds seed + i when seeded). Each owns
        a copy of params (a caller changing its object later changes nothing) and its own
        policy. Changes no state but the engine's seed and id draws. router: the engine's."""
        params = replace(check_params(params))  # re-validated, and the request's own
        ids = prompt_token_ids(prompt, index, self.tokenizer, self.vocab_limit, self.config.max_model_len)
        make_policy(params, 0, self.has_slm, self.has_llm, router)  # refuses what this engine cannot serve
        self.scheduler.check_fits(len(ids), params.max_tokens, params.n)
        if request_id is not None:
            if not isinstance(request_id, str) or not request_id:
                raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
            if self._taken(request_id):
                raise ValueError(f"request id {request_id!r} is already in the engine")
        rid = request_id if request_id is not None else self._new_id()
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**62))
        seeds = [seed] if params.n == 1 else [(seed + i) % 2**64 for i in range(params.n)]
        names = [rid] if params.n == 1 else [f"{rid}#{i}" for i in range(params.n)]
        seqs = [Sequence(name, ids, params, make_policy(params, s, self.has_slm, self.has_llm, router), s,
                         self.config.max_model_len, self.config.max_llm_wait) for name, s in zip(names, seeds)]
        if params.n > 1:
            for i, s in enumerate(seqs):
                s.index, s.group = i, seqs
        return seqs

    def _taken(self, rid: str) -> bool:
        group = self.groups.get(rid)
        return rid in self.inbox or (group is not None and any(c in self.inbox for c in group))

    def _new_id(self) -> str:
        """An id no request in the engine has (a caller's own ids included)."""
        while True:
            rid = f"req-{next(self._ids)}"
            if not self._taken(rid):
                return rid

    def add(self, seqs: List[Sequence], owner: Hashable = STEP_API) -> str:
        """Queue a request's sequences for this consumer; -> the request's id."""
        for seq in seqs:
            self.inbox.register(seq.request_id, owner)
        for seq in seqs:
            self.scheduler.add(seq)
        if len(seqs) == 1:
            return seqs[0].request_id
        rid = seqs[0].request_id.rsplit("#", 1)[0]
        self.groups[rid] = [s.request_id for s in seqs]
        return rid

    def output(self, seq: Sequence) -> RequestOutput:
        return request_output(seq, with_text=self.tokenizer is not None, profiled=self.config.profile)

    def emit(self, event: TokenEvent) -> None:
        self.inbox.put(event)

    def take(self, owner: Hashable) -> List[TokenEvent]:
        events = self.inbox.take(owner)
        self._settle([ev.request_id for ev in events if ev.finish_reason is not None])
        return events

    def release(self, owner: Hashable) -> None:
        self._settle(self.inbox.release(owner))

    def _settle(self, request_ids: List[str]) -> None:
        """Forget the n>1 requests whose every sample has left the inbox (their owners took
        the final events): their id is free again, and the table does not grow with every
        such request a server ever ran."""
        for rid in request_ids:
            gid = rid.rsplit("#", 1)[0]
            group = self.groups.get(gid)
            if group is not None and rid in group and not any(c in self.inbox for c in group):
                del self.groups[gid]

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """End a live request now and free its blocks; -> its output (None when it is not
        live: unknown, or already finished). A stream or generate that owns it gets a
        final "abort" event; the step API's own requests get none (the caller holds the
        output), and their events not yet taken are dropped."""
        if request_id in self.groups:  # every live sample; -> the first one's output
            outs = [self.abort(child) for child in self.groups.pop(request_id)]
            return next((o for o in outs if o is not None), None)
        seq = self.scheduler.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        out = self.output(seq)
        if self.inbox.owner.get(request_id) == STEP_API:
            self.inbox.drop(request_id)
            self._settle([request_id])
        elif request_id in self.inbox:
            self.inbox.put(TokenEvent(request_id, None, "", False, None, "abort", out))
        return out
