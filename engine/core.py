"""EngineCore: the step loop of routed decoding (add_request / step / abort).

One step, for every running sequence (top-down: core -> runner -> model -> ops):
  1. SLM: `self.slm.run` forwards each sequence's positions the SLM has not computed
     (the whole prompt on the first step, else the one new token) and runs the head on
     the last: per row the SLM's token, its top probability and the router score.
  2. Routing: `routing.decide` turns those signals into one decision per row: keep the
     SLM's token, or call the LLM (which then makes this token; for "speculative" the
     SLM's token is a draft and the LLM verifies the drafts).
  3. LLM catch-up: `self.llm.run` forwards every position the LLM has not seen yet, for
     all those sequences together. A sequence with tentative tokens (speculative
     drafts, or check-and-correct's unverified SLM tokens) gets the LLM's head on each
     of them (`verify`): it is rolled back on the shared page table at the first one the
     LLM rejects, and the LLM's token is taken there; otherwise the LLM's token follows.
  4. Commit: tokens that can no longer change get their stop checks, text and one
     event each; finished sequences free their blocks.
Without tentative tokens the SLM never sees a rejected proposal and nothing is rolled
back; a model computes a position again only after a rollback changed its token.

Every request has one owner (inbox.py): its events wait in that owner's inbox, so the
step API, generate() calls and streams that share the engine never see, or lose, each
other's events; a step that fails part-way keeps what it had already made.
"""
import itertools
import time
from dataclasses import replace
from typing import Hashable, List, Optional, Tuple

import numpy as np

from .detokenizer import Detokenizer
from .head import HeadSpec, StepResult
from .inbox import STEP_API, Inbox
from .model_runner import ModelRunner
from .outputs import RequestOutput, TokenEvent, request_output
from .profiler import attribute_time
from .requests import Prompt, check_params, check_servable, prompt_token_ids
from .routing import decide, draws, needs_head_first, needs_slm
from .scheduler import Scheduler
from .sequence import Sequence
from .verify import verify

__all__ = ["EngineCore", "STEP_API"]


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
        self.inbox = Inbox()
        self._rng = np.random.default_rng(config.seed)  # seeds of requests that bring none
        self._ids = itertools.count()

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
        check_servable(policy, threshold, self.slm is not None, self.llm is not None, self.router is not None,
                       params.verify)
        self.scheduler.check_fits(len(ids), params.max_tokens)
        if request_id is not None:
            if not isinstance(request_id, str) or not request_id:
                raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
            if request_id in self.inbox:
                raise ValueError(f"request id {request_id!r} is already in the engine")
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**62))
        return Sequence(request_id if request_id is not None else self._new_id(), ids, params, policy, threshold,
                        seed)

    def _new_id(self) -> str:
        """An id no request in the engine has (a caller's own ids included)."""
        while True:
            rid = f"req-{next(self._ids)}"
            if rid not in self.inbox:
                return rid

    def add(self, seq: Sequence, owner: Hashable = STEP_API) -> None:
        self.inbox.register(seq.request_id, owner)
        self.scheduler.add(seq)

    def take(self, owner: Hashable) -> List[TokenEvent]:
        return self.inbox.take(owner)

    def release(self, owner: Hashable) -> None:
        self.inbox.release(owner)

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
        if self.inbox.owner.get(request_id) == STEP_API:
            self.inbox.drop(request_id)
        elif request_id in self.inbox:
            self.inbox.put(TokenEvent(request_id, None, "", False, None, "abort", out))
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def set_router(self, router) -> None:
        """Requests already running keep their policy; graphs that read the old router are
        dropped at the next step that runs the new one."""
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
        self.inbox.put(TokenEvent(seq.request_id, None, "", False, None, "error", out))

    def _step(self, running: List[Sequence]) -> None:
        t_step = time.perf_counter()
        self.timer.reset()
        for seq in running:
            self.scheduler.ensure_slots(seq)
        slm_rows = [i for i, s in enumerate(running) if needs_slm(s) and self._room_to_draft(s)]
        llm_rows = sorted(set(range(len(running))) - set(slm_rows))  # "llm", and speculative at its cap
        routed_score: List[Optional[float]] = [None] * len(running)
        if slm_rows:
            out, to_llm = self._slm_step([running[i] for i in slm_rows])
            for j, i in enumerate(slm_rows):
                seq = running[i]
                score = out.router_score[j] if seq.policy == "router" else None  # where it decides, any batch
                if seq.policy == "speculative":  # the SLM's token is a draft either way
                    self._keep_slm_token(seq, out, j, None)
                    if to_llm[j] or not self._room_to_draft(seq) or self._ends(seq, seq.token_ids[-1]):
                        llm_rows.append(i)
                elif to_llm[j]:  # the LLM makes this token instead
                    routed_score[i] = score
                    llm_rows.append(i)
                else:
                    self._keep_slm_token(seq, out, j, score)
        if llm_rows:
            self._llm_step([running[i] for i in llm_rows], [routed_score[i] for i in llm_rows])
        if self.config.profile:
            attribute_time(self.timer.last, running, [running[i] for i in slm_rows], [running[i] for i in llm_rows],
                           time.perf_counter() - t_step)
        for seq in running:
            try:  # one request's failure here (say, detokenization) is that request's alone
                self._commit(seq)
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
        the same tokens on both paths. Sampling rows whose token stays tentative also get
        the SLM's distribution (verification needs it)."""
        use_router = self.router is not None and any(s.policy == "router" for s in seqs)
        want = [s.tentative and not s.params.greedy for s in seqs]
        spec = HeadSpec.for_seqs(seqs, self.router.params if use_router else None, want_probs=want)
        draw = draws(seqs)
        first = None
        if not self.slm.fused_head and spec.want_probs is None:
            first = [i for i, s in enumerate(seqs) if needs_head_first(s.policy)]
        out = self.slm.run(seqs, spec, head_rows=first)
        to_llm = decide(seqs, out.top_prob, out.router_score, draw)
        if first is not None:
            done = set(first)
            rest = [i for i in range(len(seqs)) if i not in done and not to_llm[i]]
            if rest:
                self.slm.head(out, rest, spec)
        return out, to_llm

    def _keep_slm_token(self, seq: Sequence, out: StepResult, j: int, score: Optional[float]) -> None:
        seq.append(out.tokens[j], False, score, commit=not seq.tentative)
        if seq.tentative:
            if out.probs is not None and not seq.params.greedy:
                seq.draft_probs[len(seq) - 1] = out.probs[j][0].cpu()
            if seq.policy == "speculative":
                seq.stats["drafted"] += 1

    def _llm_step(self, seqs: List[Sequence], scores: List[Optional[float]]) -> None:
        """The LLM's catch-up for these sequences: its token for each, after verifying
        (and rolling back) their tentative tokens."""
        for seq in seqs:
            self.scheduler.ensure_slots(seq)  # this step's drafts
        positions = [s.num_tentative + 1 for s in seqs]
        want = [s.num_tentative > 0 and not s.params.greedy for s in seqs]
        out = self.llm.run(seqs, HeadSpec.for_seqs(seqs, positions=positions, want_probs=want))
        for r, (seq, score) in enumerate(zip(seqs, scores)):
            seq.stats["llm_calls"] += 1
            w = seq.num_tentative
            if w:
                tokens = out.position_tokens[r] if out.position_tokens is not None else [out.tokens[r]]
                kept, token = verify(seq, tokens, out.probs[r].cpu() if want[r] else None)
                if seq.policy == "speculative":
                    seq.stats["accepted"] += kept
                if kept < w:  # roll back to the first rejected token; the LLM's replaces it
                    score = seq.router_scores[seq.committed + kept - seq.num_prompt_tokens]
                    self.scheduler.truncate(seq, seq.committed + kept)
                    seq.stats["corrected"] = seq.stats.get("corrected", 0) + 1
            else:
                token = out.tokens[r]
            seq.append(token, True, score, commit=True)

    # ---- commit: stop checks, text, events --------------------------------------------
    def _room_to_draft(self, seq: Sequence) -> bool:
        """Speculative: one more draft and the LLM's token after it still fit the request."""
        return seq.policy != "speculative" or len(seq) + 2 <= min(seq.max_len, self.config.max_model_len)

    def _ends(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        return (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids

    def _commit(self, seq: Sequence) -> None:
        """One event per token that became final this step, with its stop checks: the
        first token that ends the request finishes it (later ones are dropped). An
        unverified SLM token of check-and-correct that ends the request commits the rest."""
        if seq.finish_reason is not None:
            return
        if seq.num_tentative and seq.params.verify and (self._ends(seq, seq.token_ids[-1]) or self._at_length(seq)):
            seq.committed = len(seq)
        for t in range(seq.emitted, seq.committed):
            token = seq.token_ids[t]
            stop_id, length = self._ends(seq, token), self._at_length(seq, t + 1)
            delta, stop_str = self.detok.update(seq, t + 1, finishing=stop_id or length)
            seq.emitted = t + 1
            k = t - seq.num_prompt_tokens
            reason = "stop" if (stop_str or stop_id) else "length" if length else None
            if reason is None:
                self.inbox.put(TokenEvent(seq.request_id, token, delta, seq.from_llm[k], seq.router_scores[k]))
                continue
            seq.committed = t + 1
            if len(seq) > t + 1:
                self.scheduler.truncate(seq, t + 1)
            self.scheduler.finish(seq, reason)
            self.inbox.put(TokenEvent(seq.request_id, token, delta, seq.from_llm[k], seq.router_scores[k], reason,
                                      self.output(seq)))
            return

    def _at_length(self, seq: Sequence, n: Optional[int] = None) -> bool:
        n = len(seq) if n is None else n
        return n - seq.num_prompt_tokens >= seq.params.max_tokens or n >= self.config.max_model_len

    # ---- outputs --------------------------------------------------------------------
    def output(self, seq: Sequence) -> RequestOutput:
        return request_output(seq, with_text=self.tokenizer is not None)
