"""EngineCore: the step loop of routed decoding (add_request / step / abort).

One step, for every running sequence (top-down: core -> runner -> model -> ops):
  1. schedule: the scheduler admits waiting requests and hands out the running ones.
  2. SLM: `self.slm.run` forwards each sequence's positions the SLM has not computed
     (the whole prompt on the first step, else the one new token) and runs the head on
     the last; each row's policy (policies.py) decides there whether the LLM makes this
     token (for "speculative": whether the LLM verifies the drafts now). The SLM's token
     stands where it does not; the core records it.
  3. LLM catch-up: `self.llm.run` forwards every position the LLM has not seen yet, for
     all the sequences it makes a token for, together. A sequence with tentative tokens
     (speculative drafts, or check-and-correct's unverified SLM tokens) gets the LLM's
     head on each of them (`verify`): it is rolled back on the shared page table at the
     first one the LLM rejects, and the LLM's token is taken there; otherwise the LLM's
     token follows.
  4. commit: tokens that can no longer change get their stop checks, text and one event
     each; finished sequences free their blocks.
Without tentative tokens the SLM never sees a rejected proposal and nothing is rolled
back; a model computes a position again only after a rollback changed its token. The
runners change no sequence: they return what they computed, and the core records it.

Every request has one owner (inbox.py, through intake.Requests): its events wait in that
owner's inbox, so the step API, generate() calls and streams that share the engine never
see, or lose, each other's events; a step that fails part-way keeps what it had already
made, and a failed request's output holds exactly the tokens its owner was sent.
"""
import time
from typing import Hashable, List, Optional, Tuple

from .detokenizer import Detokenizer
from .head import StepResult, head_spec
from .inbox import STEP_API
from .intake import Requests
from .model_runner import ModelRunner
from .models.head import HeadSpec
from .models.router import Router
from .outputs import RequestOutput, TokenEvent, TokenLogprob
from .policies import RoutingStep
from .prefix import share_prefix
from .profiler import attribute_time
from .requests import Prompt
from .scheduler import Scheduler, live_samples
from .sequence import Sequence
from .verify import verify

__all__ = ["EngineCore", "STEP_API"]



def _without(seqs: List[Sequence], drop: List[Sequence]) -> List[Sequence]:
    gone = {id(s) for s in drop}
    return [s for s in seqs if id(s) not in gone]


class EngineCore:
    def __init__(self, config, block_manager, slm: Optional[ModelRunner], llm: Optional[ModelRunner],
                 router: Optional[Router], tokenizer, eos_token_ids, vocab_limit: int, timer, tuner=None):
        self.config = config
        self.bm = block_manager
        self.slm, self.llm = slm, llm
        self.router = router
        self.scheduler = Scheduler(config, block_manager)
        self.requests = Requests(config, self.scheduler, tokenizer, vocab_limit, slm is not None, llm is not None)
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer)
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_limit = vocab_limit
        self.timer = timer
        self.steps = 0  # steps run so far: the clock deferred LLM calls wait by
        self.tuner = tuner  # threads.ThreadTuner on the CPU (None: a fixed thread count)

    # ---- requests in and out (intake.Requests) ------------------------------------------
    def make_sequences(self, prompt: Prompt, params, index: int = 0,
                       request_id: Optional[str] = None) -> List[Sequence]:
        return self.requests.make_sequences(prompt, params, self.router, index, request_id)

    def add(self, seqs: List[Sequence], owner: Hashable = STEP_API) -> str:
        return self.requests.add(seqs, owner)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        return self.requests.abort(request_id)

    def take(self, owner: Hashable) -> List[TokenEvent]:
        return self.requests.take(owner)

    def release(self, owner: Hashable) -> None:
        self.requests.release(owner)

    def get(self, request_id: str) -> Optional[Sequence]:
        """A live request's sequence (None when unknown or finished)."""
        return self.scheduler.get(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def set_router(self, router: Optional[Router]) -> None:
        """Requests already running keep their policy and threshold; graphs that read the
        old router are dropped at the next step that runs the new one. Dropping the router
        is refused while requests that route with it are in the engine."""
        if router is None:
            live = [s.request_id for s in self.scheduler.by_id.values() if s.policy.reads_router]
            if live:
                raise ValueError(f"cannot drop the router while {len(live)} request(s) with policy 'router' "
                                 f"are in the engine ({live[:3]}); abort them or let them finish first")
        self.router = router

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> None:
        """One step of every running request; its events go to their owners' inboxes. If
        the step fails as a whole (a model forward raised), every request in it that has
        not finished fails ("error" final event, blocks freed) and the error propagates."""
        running = list(self.scheduler.schedule())
        if not running:
            return
        t0, now = time.perf_counter(), self.steps
        self.steps += 1
        self.timer.reset()
        if self.tuner is not None:
            decode_only = all(len(s) - min(s.num_computed["slm"] if s.policy.uses_slm else len(s),
                                           s.num_computed["llm"] if s.policy.uses_llm else len(s)) <= 16
                              for s in running)
            self.tuner.before_step()
        llm_seqs: List[Sequence] = []
        try:
            self._prepare(running)
            active = [s for s in running if not s.parked]
            slm_seqs = [s for s in active if s.policy.uses_slm and self._room_to_draft(s)]
            for seq in _without(active, slm_seqs):  # "llm", and speculative drafts at their cap
                self.scheduler.wait_for_llm(seq, now, parked=True)
            if slm_seqs:
                self._slm_step(slm_seqs, now)
            llm_seqs = self.scheduler.llm_batch(now)
            if llm_seqs:
                self._llm_step(llm_seqs)
            elif self.config.llm_prefill == "idle" and self.llm is not None:
                self._llm_prefill(running)
        except BaseException as exc:
            for seq in running:  # leave nothing half-done: these requests fail, blocks come back
                if seq.finish_reason is None:
                    self._fail(seq, exc)
            raise
        if self.tuner is not None:
            self.tuner.after_step(len(running), decode_only)
        if self.config.profile:
            attribute_time(self.timer.last, running, slm_seqs, llm_seqs, time.perf_counter() - t0)
        for seq in running:
            self._commit(seq)

    def _prepare(self, running: List[Sequence]) -> None:
        """The n samples of a prompt share its prefix (computed once); KV slots for every token."""
        for seq in running:
            group = live_samples(seq)
            if len(group) > 1 and seq is group[0] and seq.num_computed["slm"] == seq.num_computed["llm"] == 0:
                share_prefix(group, self.slm, self.llm, self.bm, self.config.block_size)
        for seq in running:
            self.scheduler.ensure_slots(seq)

    def _slm_step(self, seqs: List[Sequence], now: int) -> None:
        """The SLM's step: its token where the policy keeps it (or drafts it); the rows the
        LLM makes this token for wait for it (parked). Sampling rows whose token stays
        tentative also get the SLM's distribution (verification needs it). With deferred
        LLM calls, check-and-correct rows keep the SLM's token when routed and go on
        drafting; the LLM checks them when it runs."""
        router = self.router.params if self.router is not None and any(s.policy.reads_router for s in seqs) else None
        want = [s.policy.tentative and not s.params.greedy for s in seqs]
        bans = [self._banned(s) if s.min_tokens_left(len(s)) else () for s in seqs]
        defer = [s.policy.verify and s.max_llm_wait > 0 for s in seqs]
        out = self.slm.run(seqs, head_spec(seqs, router, want_probs=want, bans=bans),
                           route=RoutingStep(seqs, always_head=defer))
        for j, seq in enumerate(seqs):
            seq.record_forward("slm", *out.spans[j])
            score = out.router_score[j] if seq.policy.reads_router else None  # where it decides, any batch
            token = out.tokens[j]
            if seq.policy.drafts:  # the SLM's token is a draft either way
                self._keep_slm_token(seq, out, j, None)
                if out.to_llm[j] or not self._room_to_draft(seq) or self._ends(seq, token):
                    self.scheduler.wait_for_llm(seq, now, parked=True)
            elif out.to_llm[j] and not defer[j]:
                self.scheduler.wait_for_llm(seq, now, parked=True, score=score)  # the LLM makes this token
            elif seq.policy.tentative and (seq.num_tentative or defer[j]) and len(seq) + 1 >= seq.max_len:
                # the request's last position, whatever the SLM chose: the LLM makes it (and checks the rest)
                self.scheduler.wait_for_llm(seq, now, parked=True, score=score)
            elif seq.policy.tentative and self._ends(seq, token):
                # no unchecked SLM token may end a request: it stays tentative and the LLM checks it now,
                # as a speculative draft. (Having the LLM make it instead ran the LLM only when a stop
                # token was sampled, while verification assumes the SLM's whole distribution: sampled
                # outputs came out short of stop tokens.)
                self._keep_slm_token(seq, out, j, score)
                self.scheduler.wait_for_llm(seq, now, parked=True)
            else:
                self._keep_slm_token(seq, out, j, score)
                if out.to_llm[j]:
                    self.scheduler.wait_for_llm(seq, now, parked=False)  # the LLM checks it later

    def _keep_slm_token(self, seq: Sequence, out: StepResult, j: int, score: Optional[float]) -> None:
        tentative = seq.policy.tentative
        seq.append(out.tokens[j], False, score, commit=not tentative,
                   logprob=_logprob(seq, out.logprobs, j, 0, out.tokens[j]))
        if tentative and out.probs is not None and not seq.params.greedy:
            seq.draft_probs[len(seq) - 1] = out.probs[j][0].cpu()
        if seq.policy.drafts:
            seq.stats.drafted += 1

    def _llm_step(self, seqs: List[Sequence]) -> None:
        """The LLM's catch-up for these sequences: its token for each, after verifying
        (and rolling back) their tentative tokens."""
        for seq in seqs:
            self.scheduler.ensure_slots(seq)  # this step's drafts
        head_tokens = [s.num_tentative + 1 for s in seqs]
        want = [s.num_tentative > 0 and not s.params.greedy for s in seqs]
        bans = [self._banned(s) for s in seqs]
        ban_rows = [s.min_tokens_left(s.committed) for s in seqs]
        out = self.llm.run(seqs, head_spec(seqs, head_tokens=head_tokens, want_probs=want, bans=bans,
                                           ban_rows=ban_rows), head_tokens)
        for r, seq in enumerate(seqs):
            seq.record_forward("llm", *out.spans[r])
            seq.stats.llm_calls += 1
            w, kept, score = seq.num_tentative, 0, seq.routed_score
            if w:
                tokens = out.position_tokens[r] if out.position_tokens is not None else [out.tokens[r]]
                kept, token = verify(seq, tokens, out.probs[r].cpu() if want[r] else None)
                if seq.policy.drafts:
                    seq.stats.accepted += kept
                if kept < w:  # roll back to the first rejected token; the LLM's replaces it
                    score = seq.router_scores[seq.committed + kept - seq.num_prompt_tokens]
                    self.scheduler.truncate(seq, seq.committed + kept)
                    seq.stats.corrected += 1
            else:
                token = out.tokens[r]
            seq.append(token, True, score, commit=True, logprob=_logprob(seq, out.logprobs, r, kept, token))
            seq.draft_probs.clear()  # every token is committed now
        self.scheduler.llm_done(seqs)

    def _llm_prefill(self, running: List[Sequence]) -> None:
        """A step without an LLM call: the LLM reads the prompts it has not read yet of the
        running requests that may call it (one batched prefill), so that their first call is
        a short catch-up, not the whole prompt alone. It stops one short of the prompt's end:
        the catch-up's head needs the last committed position (the LLM's next token, or its
        check of the first tentative one) among the positions it computes."""
        seqs = [s for s in running if s.policy.uses_llm and s.finish_reason is None
                and s.num_computed["llm"] < s.num_prompt_tokens - 1]
        if not seqs:
            return
        n = len(seqs)
        out = self.llm.run(seqs, HeadSpec([0.0] * n, [0] * n), ends=[s.num_prompt_tokens - 1 for s in seqs])
        for seq, span in zip(seqs, out.spans):
            seq.record_forward("llm", *span)

    # ---- commit: stop checks, text, events --------------------------------------------
    def _room_to_draft(self, seq: Sequence) -> bool:
        """Speculative: one more draft and the LLM's token after it still fit the request."""
        return not seq.policy.drafts or len(seq) + 2 <= seq.max_len

    def _ends(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        return (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids

    def _banned(self, seq: Sequence) -> Tuple[int, ...]:
        """The ids a request under its min_tokens may not choose: those that would end it."""
        p = seq.params
        if not p.min_tokens:
            return ()
        return tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)))

    def _commit(self, seq: Sequence) -> None:
        """One event per token that became final this step, with its stop checks: the first
        token that ends the request finishes it (later ones are dropped). A failure here
        (say, detokenization) is this request's alone."""
        try:
            self._emit(seq)
        except Exception as exc:
            self._fail(seq, exc)

    def _emit(self, seq: Sequence) -> None:
        if seq.finish_reason is not None:
            return
        for t in range(seq.emitted, seq.committed):
            token = seq.token_ids[t]
            early = seq.min_tokens_left(t + 1) > 0  # nothing but length ends it yet
            stop_id, length = self._ends(seq, token) and not early, t + 1 >= seq.max_len
            # a stop token's own text (EOS, stop_token_ids) is left out unless asked for, as vLLM does
            upto = t if stop_id and not seq.params.include_stop_str_in_output else t + 1
            delta, stop_str = self.detok.update(seq, upto, finishing=stop_id or length, stop_strings=not early)
            seq.emitted = t + 1
            k = t - seq.num_prompt_tokens
            reason = "stop" if (stop_str or stop_id) else "length" if length else None
            if reason is None:
                self.requests.emit(TokenEvent(seq.request_id, token, delta, seq.from_llm[k], seq.router_scores[k],
                                              logprob=seq.logprobs[k]))
                continue
            seq.committed = t + 1
            if len(seq) > t + 1:
                self.scheduler.truncate(seq, t + 1)
            self.scheduler.finish(seq, reason)
            self.requests.emit(TokenEvent(seq.request_id, token, delta, seq.from_llm[k], seq.router_scores[k], reason,
                                          self.requests.output(seq), seq.logprobs[k]))
            return

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        """The request fails: blocks freed, its owner gets an "error" final event whose output
        holds exactly the tokens it was sent."""
        self.scheduler.finish(seq, "error")  # also when it had finished: its final event is this one
        out = self.requests.output(seq)
        out.error = f"{type(exc).__name__}: {exc}"
        self.requests.emit(TokenEvent(seq.request_id, None, "", False, None, "error", out))


def _logprob(seq: Sequence, logprobs, row: int, position: int, token: int):
    """The TokenLogprob of a token a model chose at row `row` of its step (position
    `position` of that row's head positions), when the request asked for logprobs."""
    if seq.params.logprobs is None or logprobs is None or logprobs[row] is None:
        return None
    return TokenLogprob.from_row(logprobs[row][position], token, seq.params.logprobs)
