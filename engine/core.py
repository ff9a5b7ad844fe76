"""EngineCore: the step loop of routed decoding (add_request / step / abort).

One step, for every running sequence:
  1. SLM: one varlen forward over each sequence's positions the SLM has not computed
     (the whole prompt on the first step, else the one new token), then the head:
     the SLM's proposal, its top probability and the router score.
  2. Routing: per sequence, keep the SLM's token or hand this position to the LLM.
  3. LLM catch-up: one varlen forward over every position the LLM has not seen yet, for
     all routed sequences together; the LLM's token replaces the proposal.
  4. Append, check stop conditions, free finished sequences' blocks.
The SLM never sees its rejected proposal: it reads the chosen token as its next input,
so routing needs no rollback and no position is computed twice by the same model.
"""
import time
from typing import Dict, List, Optional

import torch

from citer.outputs import RequestOutput, TokenEvent

from .detokenizer import Detokenizer
from .model_runner import ModelRunner
from .profiler import PhaseTimer
from .routing import needs_slm, route_to_llm
from .sampler import HeadOutput, needs_full_logits, run_head, sampling_inputs
from .scheduler import Scheduler
from .sequence import Sequence


class EngineCore:
    def __init__(self, config, block_manager, slm: Optional[ModelRunner], llm: Optional[ModelRunner],
                 router, tokenizer, eos_token_ids, vocab_limit: int):
        self.config = config
        self.bm = block_manager
        self.slm, self.llm, self.router = slm, llm, router
        self.scheduler = Scheduler(config, block_manager)
        self.detok = Detokenizer(tokenizer)
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_limit = vocab_limit
        sync = torch.cuda.synchronize if torch.device(config.device).type == "cuda" else None
        self.timer = PhaseTimer(config.profile, sync)

    # ---- requests -------------------------------------------------------------------
    def validate(self, seq: Sequence) -> None:
        """Raise if this engine cannot serve the request; changes nothing."""
        if seq.policy != "llm" and self.slm is None:
            raise ValueError(f"policy {seq.policy!r} needs an SLM")
        if seq.policy != "slm" and self.llm is None:
            raise ValueError(f"policy {seq.policy!r} needs an LLM, and this engine has none")
        if seq.policy == "router" and self.router is None:
            raise ValueError("policy 'router' needs a router, and this engine has none")
        if seq.policy == "router" and seq.threshold is None:
            raise ValueError("policy 'router' needs a threshold")
        self.scheduler.check_fits(seq.num_prompt_tokens, seq.params.max_tokens)

    def add_request(self, seq: Sequence) -> None:
        self.validate(seq)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        seq = self.scheduler.by_id.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self.output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def get(self, request_id: str) -> Optional[Sequence]:
        return self.scheduler.by_id.get(request_id)

    # ---- the step -------------------------------------------------------------------
    def step(self) -> List[TokenEvent]:
        running = list(self.scheduler.schedule())
        if not running:
            return []
        try:
            return self._step(running)
        except BaseException:
            for seq in running:  # leave nothing half-done: these requests fail, blocks come back
                if seq.finish_reason is None:
                    self.scheduler.finish(seq, "error")
            raise

    def _step(self, running: List[Sequence]) -> List[TokenEvent]:
        t_step = time.perf_counter()
        self.timer.reset()
        for seq in running:
            self.scheduler.ensure_slots(seq)

        slm_seqs = [s for s in running if needs_slm(s)]
        slm_tokens: Dict[int, int] = {}
        scores: Dict[int, float] = {}
        routed = [s for s in running if not needs_slm(s)]  # policy "llm"
        if slm_seqs:
            self._slm_step(slm_seqs, slm_tokens, scores, routed)

        llm_tokens: Dict[int, int] = {}
        if routed:
            with self.timer.phase("llm"):
                head = self._forward_head(self.llm, routed, "llm", None)
            for seq, tok in zip(routed, head.tokens):
                llm_tokens[id(seq)] = tok
                seq.stats["llm_calls"] += 1

        events = []
        for seq in running:
            from_llm = id(seq) in llm_tokens
            token = llm_tokens[id(seq)] if from_llm else slm_tokens[id(seq)]
            score = scores.get(id(seq), float("nan"))
            events.append(self._append(seq, token, from_llm, None if score != score else score))
        self._attribute_time(running, slm_seqs, routed, time.perf_counter() - t_step)
        return events

    def _slm_step(self, seqs: List[Sequence], tokens: Dict[int, int], scores: Dict[int, float],
                  routed: List[Sequence]) -> None:
        """SLM forward, router, routing decisions, SLM head. Fills tokens (the SLM's, for the
        sequences it keeps) and scores, and appends the sequences routed to the LLM.

        Fused (Triton or CUDA graphs, not profiling): one routed-head pass gives every row
        its token, top probability and router score (in a CUDA graph with the model body,
        when enabled), then each row is routed. Otherwise the router MLP runs first,
        policies that need nothing from the SLM's head ("router", "random") decide at
        once, and the lm_head runs only for the rows the SLM keeps (plus the "confidence"
        rows, whose rule reads the SLM's top probability). Every row draws its sampling
        seed either way, so seeded sampling gives the same tokens on both paths."""
        use_router = self.router is not None and any(s.policy == "router" for s in seqs)
        fused = self.slm.ops.name == "triton" or self.slm.graphs is not None  # a graph holds the head too
        if fused and not self.config.profile:
            with self.timer.phase("slm"):
                head = self._forward_head(self.slm, seqs, "slm", self.router.params if use_router else None)
            top_prob, score = head.top_prob.tolist(), head.router_score.tolist()
            for j, seq in enumerate(seqs):
                tokens[id(seq)] = head.tokens[j]
                if use_router:
                    scores[id(seq)] = score[j]
                if route_to_llm(seq, top_prob[j], score[j]):
                    routed.append(seq)
            return

        with self.timer.phase("slm"):
            hidden = self._forward(self.slm, seqs, "slm")
        temperature, seeds = sampling_inputs(seqs)  # every row draws, as in the fused path
        if use_router:
            with self.timer.phase("slm"):
                h = self.slm.model.final_norm(self.slm.ops, hidden)
            with self.timer.phase("router"):
                scores.update(zip(map(id, seqs), self.router.score(h).tolist()))
        head_rows = []
        for i, seq in enumerate(seqs):
            if seq.policy in ("router", "random"):  # decided before the head
                if route_to_llm(seq, float("nan"), scores.get(id(seq), float("nan"))):
                    routed.append(seq)
                    continue
            head_rows.append(i)
        if not head_rows:
            return
        head_seqs = [seqs[i] for i in head_rows]
        with self.timer.phase("slm"):
            head = run_head(self.slm.ops, self.slm.model, hidden[head_rows], head_seqs, self.vocab_limit,
                            inputs=([temperature[i] for i in head_rows], [seeds[i] for i in head_rows]))
        top_prob = head.top_prob.tolist()
        for j, seq in enumerate(head_seqs):
            tokens[id(seq)] = head.tokens[j]
            if seq.policy not in ("router", "random") and route_to_llm(seq, top_prob[j], float("nan")):
                routed.append(seq)

    def _forward_head(self, runner: ModelRunner, seqs: List[Sequence], which: str, router) -> HeadOutput:
        """Forward the positions `which` has not computed, then the head on each last one:
        through the runner's CUDA graphs when it has them and the step fits a bucket."""
        starts, ends = self._spans(seqs, which)
        inputs = sampling_inputs(seqs)
        out = runner.graphs.run(seqs, starts, ends, router, *inputs) if runner.graphs is not None else None
        if out is None:
            hidden = runner.forward(seqs, starts, ends)
            head = run_head(runner.ops, runner.model, hidden, seqs, self.vocab_limit, router, inputs)
        elif needs_full_logits(seqs):  # top-k / top-p rows: the graph's body, the eager head
            head = run_head(runner.ops, runner.model, out[0], seqs, self.vocab_limit, router, inputs)
        else:
            packed = out[1].cpu()  # tokens, top_prob, score: one copy
            head = HeadOutput(packed[0].long().tolist(), packed[1].float(), packed[2].float())
        self._mark_computed(seqs, which, starts, ends)
        return head

    def _forward(self, runner: ModelRunner, seqs: List[Sequence], which: str) -> torch.Tensor:
        starts, ends = self._spans(seqs, which)
        hidden = runner.forward(seqs, starts, ends)
        self._mark_computed(seqs, which, starts, ends)
        return hidden

    @staticmethod
    def _spans(seqs: List[Sequence], which: str):
        return [getattr(s, f"{which}_computed") for s in seqs], [len(s) for s in seqs]

    @staticmethod
    def _mark_computed(seqs: List[Sequence], which: str, starts: List[int], ends: List[int]) -> None:
        for s, a, b in zip(seqs, starts, ends):
            setattr(s, f"{which}_computed", b)
            s.stats[f"{which}_forward_tokens"] += b - a

    def _append(self, seq: Sequence, token: int, from_llm: bool, score) -> TokenEvent:
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
        stats = dict(seq.stats)
        n = seq.num_output_tokens
        stats["llm_tokens"] = sum(seq.from_llm)
        stats["llm_share"] = stats["llm_tokens"] / n if n else 0.0
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=list(seq.prompt_token_ids),
            token_ids=seq.output_token_ids,
            text=seq.text if self.detok.tokenizer is not None else None,
            finish_reason=seq.finish_reason,
            from_llm=list(seq.from_llm),
            router_scores=list(seq.router_scores),
            stats=stats,
        )
