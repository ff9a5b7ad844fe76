"""EngineCore: the step loop of routed decoding (add_request / step / abort).

One step, for every running sequence (top-down: core -> runner -> model -> ops):
  1. SLM: `self.slm.run` forwards each sequence's positions the SLM has not computed
     (the whole prompt on the first step, else the one new token) and runs the head on
     the last: per row the SLM's token, its top probability and the router score.
  2. Routing: `routing.decide` turns those signals into one decision per row (keep the
     SLM's token, or hand this position to the LLM).
  3. LLM catch-up: `self.llm.run` forwards every position the LLM has not seen yet, for
     all routed sequences together; the LLM's token replaces the proposal.
  4. Append, check stop conditions, free finished sequences' blocks.
The SLM never sees its rejected proposal: it reads the chosen token as its next input,
so routing needs no rollback and no position is computed twice by the same model.

Every request has one owner, the consumer that added it: the step API (STEP_API), or
one generate() call or one stream() (an opaque key each). The core puts each event of a
step into its owner's inbox as the event is made, and keeps it there until that owner
takes it (`take`), so consumers that share the engine never see, or lose, each other's
events; a step that fails part-way keeps what it had already made. A request whose
final event is still in an inbox keeps its id.
"""
import itertools
import time
from collections import deque
from dataclasses import replace
from typing import Deque, Dict, Hashable, List, Optional, Tuple

import numpy as np

from .detokenizer import Detokenizer
from .head import HeadSpec, StepResult
from .model_runner import ModelRunner
from .outputs import RequestOutput, TokenEvent, llm_share
from .requests import Prompt, check_params, check_servable, prompt_token_ids
from .routing import decide, draws, needs_head_first, needs_slm
from .scheduler import Scheduler
from .sequence import Sequence

STEP_API = "step-api"  # the owner of requests added through Engine.add_request


class EngineCore:
    def __init__(self, config, block_manager, slm: Optional[ModelRunner], llm: Optional[ModelRunner],
                 router, tokenizer, eos_token_ids, vocab_limit: int, timer):
        self.config = config
        self.bm = block_manager
        self.slm, self.llm = slm, llm
        self.router = router  # a citer.router.FoldedRouter (params, default_threshold) or None
        self.scheduler = Scheduler(config, block_manager)
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer)
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_limit = vocab_limit
        self.timer = timer
        self._rng = np.random.default_rng(config.seed)  # seeds of requests that bring none
        self._ids = itertools.count()
        self.owner: Dict[str, Hashable] = {}  # request id -> its consumer, until it took the final event
        self.inbox: Dict[Hashable, Deque[TokenEvent]] = {}  # consumer -> events not yet taken

    # ---- requests -------------------------------------------------------------------
    def default_policy(self) -> str:
        if self.router is not None and self.llm is not None:
            return "router"
        return "slm" if self.slm is not None else "llm"

    def make_sequence(self, prompt: Prompt, params, index: int = 0, request_id: Optional[str] = None) -> Sequence:
        """Every check a request gets, in one place; -> its Sequence, which owns a copy of
        params (a caller changing its object later changes nothing). Changes no state but
        the engine's seed and id draws."""
        params = replace(check_params(params))  # re-validated, and the request's own
        ids = prompt_token_ids(prompt, index, self.tokenizer, self.vocab_limit, self.config.max_model_len)
        policy = params.policy or self.default_policy()
        threshold = params.threshold
        if threshold is None and self.router is not None:
            threshold = self.router.default_threshold
        check_servable(policy, threshold, self.slm is not None, self.llm is not None, self.router is not None)
        self.scheduler.check_fits(len(ids), params.max_tokens)
        if request_id is not None:
            if not isinstance(request_id, str) or not request_id:
                raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
            if request_id in self.owner:
                raise ValueError(f"request id {request_id!r} is already in the engine")
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**62))
        return Sequence(request_id if request_id is not None else self._new_id(), ids, params, policy, threshold,
                        seed)

    def _new_id(self) -> str:
        """An id no request in the engine has (a caller's own ids included)."""
        while True:
            rid = f"req-{next(self._ids)}"
            if rid not in self.owner:
                return rid

    def add(self, seq: Sequence, owner: Hashable = STEP_API) -> None:
        if seq.request_id in self.owner:  # two sequences made before either was added
            raise ValueError(f"request id {seq.request_id!r} is already in the engine")
        self.owner[seq.request_id] = owner
        self.inbox.setdefault(owner, deque())
        self.scheduler.add(seq)

    def take(self, owner: Hashable) -> List[TokenEvent]:
        """The events waiting for this consumer, oldest first (each is given out once)."""
        box = self.inbox.get(owner)
        if not box:
            return []
        events = list(box)
        box.clear()
        for ev in events:
            if ev.finish_reason is not None:
                self.owner.pop(ev.request_id, None)
        return events

    def release(self, owner: Hashable) -> None:
        """A generate() or stream() is done: drop its inbox and its requests' ids (abort
        its live requests first)."""
        self.inbox.pop(owner, None)
        for rid in [r for r, o in self.owner.items() if o == owner]:
            del self.owner[rid]

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """End a live request now and free its blocks; -> its output (None when it is not
        live: unknown, or already finished). A stream or generate that owns it gets a
        final "abort" event; the step API's own requests get none (the caller holds the
        output), and their events not yet taken are dropped."""
        seq = self.scheduler.by_id.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        out = self.output(seq)
        owner = self.owner.get(request_id)
        if owner == STEP_API:
            box = self.inbox[owner]
            kept = [ev for ev in box if ev.request_id != request_id]
            box.clear()
            box.extend(kept)
            del self.owner[request_id]
        elif owner is not None:
            self._deliver(TokenEvent(request_id, None, "", False, None, "abort", out))
        return out

    def _deliver(self, ev: TokenEvent) -> None:
        self.inbox[self.owner[ev.request_id]].append(ev)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def set_router(self, router) -> None:
        """Requests already running keep their policy; graphs that read the old router go."""
        self.router = router

    # ---- the step -------------------------------------------------------------------
    def step(self) -> None:
        """One step of every running request; its events go to their owners' inboxes. If
        the step fails as a whole (a model forward raised), every request in it that has
        not finished fails ("error" final event, blocks freed) and the error propagates."""
        running = list(self.scheduler.schedule())
        if not running:
            return
        try:
            self._step(running)
        except BaseException as exc:
            for seq in running:  # leave nothing half-done: these requests fail, blocks come back
                if seq.finish_reason is None:
                    self._fail(seq, exc)
            raise

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self.scheduler.finish(seq, "error")  # also when it had finished: its final event is this one
        out = self.output(seq)
        out.error = f"{type(exc).__name__}: {exc}"
        self._deliver(TokenEvent(seq.request_id, None, "", False, None, "error", out))

    def _step(self, running: List[Sequence]) -> None:
        t_step = time.perf_counter()
        self.timer.reset()
        for seq in running:
            self.scheduler.ensure_slots(seq)
        n = len(running)
        token: List[Optional[int]] = [None] * n
        score: List[Optional[float]] = [None] * n
        from_llm = [False] * n
        llm_rows = [i for i, s in enumerate(running) if not needs_slm(s)]  # policy "llm"
        slm_rows = [i for i, s in enumerate(running) if needs_slm(s)]
        if slm_rows:
            out, to_llm = self._slm_step([running[i] for i in slm_rows])
            for j, i in enumerate(slm_rows):
                token[i] = out.tokens[j]
                if running[i].policy == "router":  # reported where it decides, whatever the batch
                    score[i] = out.router_score[j]
                if to_llm[j]:
                    llm_rows.append(i)
        if llm_rows:
            seqs = [running[i] for i in llm_rows]
            out = self.llm.run(seqs, HeadSpec.for_seqs(seqs))
            for i, seq, tok in zip(llm_rows, seqs, out.tokens):
                token[i], from_llm[i] = tok, True
                seq.stats["llm_calls"] += 1
        self._attribute_time(running, [running[i] for i in slm_rows], [running[i] for i in llm_rows],
                             time.perf_counter() - t_step)
        for i, seq in enumerate(running):
            try:  # one request's failure here (say, detokenization) is that request's alone
                self._deliver(self._append(seq, token[i], from_llm[i], score[i]))
            except Exception as exc:
                self._fail(seq, exc)

    def _slm_step(self, seqs: List[Sequence]) -> Tuple[StepResult, List[bool]]:
        """The SLM's step and the routing decisions, aligned with seqs.

        A fused head (the Triton kernel, CUDA graphs) gives every row its token, top
        probability and router score in one pass over the lm_head. An unfused head (the
        torch references on CPU, or profiling) exits early: rows whose policy does not
        read the SLM's top probability ("router", "random") are decided on the router
        score / draw, and the lm_head runs only for the rows the SLM keeps. Every row
        draws its sampling seed either way (HeadSpec.for_seqs), so seeded sampling gives
        the same tokens on both paths."""
        use_router = self.router is not None and any(s.policy == "router" for s in seqs)
        spec = HeadSpec.for_seqs(seqs, self.router.params if use_router else None)
        draw = draws(seqs)
        first = None if self.slm.fused_head else [i for i, s in enumerate(seqs) if needs_head_first(s.policy)]
        out = self.slm.run(seqs, spec, head_rows=first)
        to_llm = decide(seqs, out.top_prob, out.router_score, draw)
        if first is not None:
            done = set(first)
            rest = [i for i in range(len(seqs)) if i not in done and not to_llm[i]]
            if rest:
                self.slm.head(out, rest, spec)
        return out, to_llm

    def _append(self, seq: Sequence, token: int, from_llm: bool, score: Optional[float]) -> TokenEvent:
        seq.token_ids.append(token)
        seq.from_llm.append(from_llm)
        seq.router_scores.append(score)
        p = seq.params
        stop_id = (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids
        length = seq.num_output_tokens >= p.max_tokens or len(seq) >= self.config.max_model_len
        delta, stop_str = self.detok.update(seq, finishing=stop_id or length)
        reason = "stop" if (stop_str or stop_id) else "length" if length else None
        if reason is None:
            return TokenEvent(seq.request_id, token, delta, from_llm, score)
        self.scheduler.finish(seq, reason)
        return TokenEvent(seq.request_id, token, delta, from_llm, score, reason, self.output(seq))

    def _attribute_time(self, running, slm_seqs, routed, total: float) -> None:
        if not self.config.profile:
            return
        t = self.timer.last
        share = {"slm": slm_seqs, "router": slm_seqs, "llm": routed}
        for phase, seqs in share.items():
            for s in seqs:
                s.stats[f"{phase}_time"] = s.stats.get(f"{phase}_time", 0.0) + t.get(phase, 0.0) / len(seqs)
        other = max(total - sum(t.values()), 0.0)
        for s in running:
            s.stats["other_time"] = s.stats.get("other_time", 0.0) + other / len(running)

    # ---- outputs --------------------------------------------------------------------
    def output(self, seq: Sequence) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=list(seq.prompt_token_ids),
            token_ids=seq.output_token_ids,
            text=seq.text if self.tokenizer is not None else None,
            finish_reason=seq.finish_reason,
            from_llm=list(seq.from_llm),
            router_scores=list(seq.router_scores),
            stats=dict(seq.stats),
        )
        out.stats["llm_tokens"] = sum(seq.from_llm)
        out.stats["llm_share"] = llm_share([out])
        return out
