"""Request intake, the part of EngineCore that takes requests in and lets them go:
every check a request gets (in one place, before any state changes), ids that never
collide, the n samples of one prompt, who owns each request's events (the inbox), and
abort. EngineCore (core.py) mixes it in beside the step loop."""
import itertools
from dataclasses import replace
from typing import Dict, Hashable, List, Optional

import numpy as np

from .inbox import STEP_API, Inbox
from .outputs import RequestOutput, TokenEvent
from .requests import Prompt, check_params, check_servable, prompt_token_ids
from .sequence import Sequence


class RequestIntake:
    def init_intake(self, seed: int) -> None:
        self.inbox = Inbox()
        self.groups: Dict[str, List[str]] = {}  # request id -> its samples' ids (SamplingParams.n > 1)
        self._rng = np.random.default_rng(seed)  # seeds of requests that bring none
        self._ids = itertools.count()

    def default_policy(self) -> str:
        if self.router is not None and self.llm is not None:
            return "router"
        return "slm" if self.slm is not None else "llm"

    def make_sequences(self, prompt: Prompt, params, index: int = 0,
                       request_id: Optional[str] = None) -> List[Sequence]:
        """Every check a request gets, in one place; -> its Sequences: one, or with
        params.n > 1 one per sample (ids "<id>#<i>", seeds seed + i when seeded). Each owns
        a copy of params (a caller changing its object later changes nothing). Changes no
        state but the engine's seed and id draws."""
        params = replace(check_params(params))  # re-validated, and the request's own
        ids = prompt_token_ids(prompt, index, self.tokenizer, self.vocab_limit, self.config.max_model_len)
        policy = params.policy or self.default_policy()
        threshold = params.threshold
        if threshold is None and self.router is not None:
            threshold = self.router.default_threshold
        check_servable(policy, threshold, self.slm is not None, self.llm is not None, self.router is not None,
                       params.verify)
        self.scheduler.check_fits(len(ids), params.max_tokens, params.n)
        if request_id is not None:
            if not isinstance(request_id, str) or not request_id:
                raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
            if self._taken(request_id):
                raise ValueError(f"request id {request_id!r} is already in the engine")
        rid = request_id if request_id is not None else self._new_id()
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**62))
        if params.n == 1:
            return [Sequence(rid, ids, params, policy, threshold, seed)]
        group = [Sequence(f"{rid}#{i}", ids, params, policy, threshold, (seed + i) % 2**64) for i in range(params.n)]
        for i, s in enumerate(group):
            s.index, s.group = i, group
        return group

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

    def take(self, owner: Hashable) -> List[TokenEvent]:
        return self.inbox.take(owner)

    def release(self, owner: Hashable) -> None:
        self.inbox.release(owner)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """End a live request now and free its blocks; -> its output (None when it is not
        live: unknown, or already finished). A stream or generate that owns it gets a
        final "abort" event; the step API's own requests get none (the caller holds the
        output), and their events not yet taken are dropped."""
        if request_id in self.groups:  # every sample; -> sample 0's output
            outs = [self.abort(child) for child in self.groups.pop(request_id)]
            return outs[0]
        seq = self.scheduler.by_id.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        out = self.output(seq)
        if self.inbox.owner.get(request_id) == STEP_API:
            self.inbox.drop(request_id)
        elif request_id in self.inbox:
            self.inbox.put(TokenEvent(request_id, None, "", False, None, "abort", out))
        return out
