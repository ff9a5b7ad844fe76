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
import time
from typing import List, Optional, Tuple

from .detokenizer import Detokenizer
from .head import HeadSpec, StepResult
from .inbox import STEP_API
from .intake import RequestIntake
from .model_runner import ModelRunner
from .prefix import share_prefix
from .outputs import RequestOutput, TokenEvent, TokenLogprob, request_output
from .profiler import attribute_time
from .routing import decide, draws, needs_head_first, needs_slm
from .scheduler import Scheduler
from .sequence import Sequence
from .verify import verify

__all__ = ["EngineCore", "STEP_API"]


class EngineCore(RequestIntake):
    def __init__(self, config, block_manager, slm: Optional[ModelRunner], llm: Optional[ModelRunner],
                 router, tokenizer, eos_token_ids, vocab_limit: int, timer):
        self.config = config
        self.bm = block_manager
        self.slm, self.llm = slm, llm
        self.router = router  # a citer.engine.models.router.FoldedRouter (params, default_threshold) or None
        self.scheduler = Scheduler(config, block_manager)
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer)
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_limit = vocab_limit
        self.timer = timer
        self.init_intake(config.seed)

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
            if seq.group is not None and seq.index == 0 and seq.num_computed["slm"] == seq.num_computed["llm"] == 0:
                share_prefix(seq.group, self.slm, self.llm, self.bm, self.config.block_size)
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
                elif to_llm[j] or (seq.params.verify and seq.num_tentative and self._would_end(seq, out.tokens[j])):
                    # the LLM makes this token instead (check-and-correct: also when the SLM's
                    # token would end the request, so that no unchecked SLM token is final)
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
        read the SLM's top probability ("router" with a hidden-only router, "random") are
        decided on the router score / draw, and the lm_head runs only for the rows the SLM
        keeps (a head-signal router reads the head's logits: every row gets the head). Every row
        draws its sampling seed either way (HeadSpec.for_seqs), so seeded sampling gives
        the same tokens on both paths. Sampling rows whose token stays tentative also get
        the SLM's distribution (verification needs it)."""
        use_router = self.router is not None and any(s.policy == "router" for s in seqs)
        want = [s.tentative and not s.params.greedy for s in seqs]
        bans = [self._banned(s) if len(s) - s.num_prompt_tokens < s.params.min_tokens else () for s in seqs]
        spec = HeadSpec.for_seqs(seqs, self.router.params if use_router else None, want_probs=want, bans=bans)
        draw = draws(seqs)
        first = None
        if not self.slm.fused_head and spec.want_probs is None and not (use_router and self.router.head_signals):
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
        seq.append(out.tokens[j], False, score, commit=not seq.tentative,
                   logprob=_logprob(seq, out.logprobs, j, 0, out.tokens[j]))
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
        bans = [self._banned(s) if s.params.min_tokens else () for s in seqs]
        ban_rows = [max(0, s.params.min_tokens - (s.committed - s.num_prompt_tokens)) for s in seqs]
        out = self.llm.run(seqs, HeadSpec.for_seqs(seqs, positions=positions, want_probs=want, bans=bans,
                                                   ban_rows=ban_rows))
        for r, (seq, score) in enumerate(zip(seqs, scores)):
            seq.stats["llm_calls"] += 1
            w = seq.num_tentative
            kept = 0
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
            seq.append(token, True, score, commit=True, logprob=_logprob(seq, out.logprobs, r, kept, token))
            seq.draft_probs.clear()  # every token is committed now

    # ---- commit: stop checks, text, events --------------------------------------------
    def _room_to_draft(self, seq: Sequence) -> bool:
        """Speculative: one more draft and the LLM's token after it still fit the request."""
        return seq.policy != "speculative" or len(seq) + 2 <= min(seq.max_len, self.config.max_model_len)

    def _ends(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        return (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids

    def _would_end(self, seq: Sequence, token: int) -> bool:
        """Appending token would end the request (stop id, or its length)."""
        return self._ends(seq, token) or self._at_length(seq, len(seq) + 1)

    def _banned(self, seq: Sequence) -> Tuple[int, ...]:
        """The ids a request under its min_tokens may not choose: those that would end it."""
        p = seq.params
        return tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)))

    def _commit(self, seq: Sequence) -> None:
        """One event per token that became final this step, with its stop checks: the
        first token that ends the request finishes it (later ones are dropped)."""
        if seq.finish_reason is not None:
            return
        for t in range(seq.emitted, seq.committed):
            token = seq.token_ids[t]
            early = t + 1 - seq.num_prompt_tokens < seq.params.min_tokens  # nothing but length ends it yet
            stop_id, length = self._ends(seq, token) and not early, self._at_length(seq, t + 1)
            delta, stop_str = self.detok.update(seq, t + 1, finishing=stop_id or length, stop_strings=not early)
            seq.emitted = t + 1
            k = t - seq.num_prompt_tokens
            reason = "stop" if (stop_str or stop_id) else "length" if length else None
            if reason is None:
                self.inbox.put(TokenEvent(seq.request_id, token, delta, seq.from_llm[k], seq.router_scores[k],
                                          logprob=seq.logprobs[k]))
                continue
            seq.committed = t + 1
            if len(seq) > t + 1:
                self.scheduler.truncate(seq, t + 1)
            self.scheduler.finish(seq, reason)
            self.inbox.put(TokenEvent(seq.request_id, token, delta, seq.from_llm[k], seq.router_scores[k], reason,
                                      self.output(seq), seq.logprobs[k]))
            return

    def _at_length(self, seq: Sequence, n: Optional[int] = None) -> bool:
        n = len(seq) if n is None else n
        return n - seq.num_prompt_tokens >= seq.params.max_tokens or n >= self.config.max_model_len

    # ---- outputs --------------------------------------------------------------------
    def output(self, seq: Sequence) -> RequestOutput:
        return request_output(seq, with_text=self.tokenizer is not None)


def _logprob(seq: Sequence, logprobs, row: int, position: int, token: int):
    """The TokenLogprob of a token a model chose at row `row` of its step (position
    `position` of that row's head positions), when the request asked for logprobs."""
    if seq.params.logprobs is None or logprobs is None or logprobs[row] is None:
        return None
    return TokenLogprob.from_row(logprobs[row][position], token, seq.params.logprobs)
