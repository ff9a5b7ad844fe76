"""Admission and block accounting for the step loop.

A request is admitted only when the blocks it may ever need (prompt + max_tokens,
capped at max_model_len) fit beside what the running requests may still claim. Blocks
are then allocated lazily as tokens arrive, so memory comes back early when a request
stops, and a running request can never hit a full cache mid-generation (no preemption,
no recomputation: each model computes each position once). Requests that cannot fit
now wait; a request that could never fit is refused at add time.

Deferred LLM calls (EngineConfig.max_llm_wait, llm_batch_min): a row routed to the LLM
joins `llm_queue` and the LLM runs for all queued rows together once one has waited its
max_llm_wait steps, llm_batch_min rows wait, or nothing else can advance. With
max_llm_wait 0 (the default) the LLM runs in the very step a row needs it.
"""
from collections import deque
from typing import Deque, Dict, List, Optional

from .config import EngineConfig
from .sequence import Sequence, capped_len


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager):
        self.config = config
        self.bm = block_manager
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.by_id: Dict[str, Sequence] = {}
        self.llm_queue: List[Sequence] = []  # rows waiting for the LLM, in the order they came to need it

    def check_fits(self, num_prompt_tokens: int, max_tokens: int, n: int = 1) -> None:
        """Raise if a request (of n samples) could never be served by this pool."""
        need = n * self.config.blocks_for(capped_len(num_prompt_tokens, max_tokens, self.config.max_model_len))
        if need > self.bm.num_blocks:
            samples = f" for its {n} samples" if n > 1 else ""
            raise ValueError(
                f"KV cache too small for this request: it needs {need} blocks of {self.config.block_size} "
                f"tokens{samples} ({num_prompt_tokens} prompt + up to {max_tokens} new), the pool has "
                f"{self.bm.num_blocks}; raise num_blocks / kv_cache_memory or lower max_tokens"
            )
        if n > self.config.max_num_seqs:
            raise ValueError(f"n={n} samples exceed max_num_seqs={self.config.max_num_seqs} (they run together)")

    def add(self, seq: Sequence) -> None:
        """Queue a request that EngineCore.make_sequences checked."""
        self.waiting.append(seq)
        self.by_id[seq.request_id] = seq

    def _outstanding(self) -> int:
        """Blocks the running requests may still claim beyond what they hold."""
        return sum(s.reserved_blocks - self.config.blocks_for(self.bm.num_tokens(s.handle))
                   for s in self.running)

    def schedule(self) -> List[Sequence]:
        """Admit waiting requests (FIFO) that fit; -> the running list. The n samples of one
        prompt (SamplingParams.n) are admitted together or not at all."""
        budget = self.config.max_num_batched_tokens
        free = self.bm.num_free_blocks - self._outstanding()
        admitted_any = False
        while self.waiting:
            seq = self.waiting[0]
            group = live_samples(seq)
            need = sum(self.config.blocks_for(s.max_len) for s in group)
            if (need > free or len(self.running) + len(group) > self.config.max_num_seqs
                    or (admitted_any and seq.num_prompt_tokens > budget)):
                break
            for s in group:
                self.waiting.remove(s)  # consecutive from the head: the samples were queued together
                s.handle = self.bm.create_sequence()
                s.reserved_blocks = self.config.blocks_for(s.max_len)
                self.running.append(s)
            free -= need
            budget -= seq.num_prompt_tokens
            admitted_any = True
        return self.running

    def ensure_slots(self, seq: Sequence) -> None:
        """Grow the sequence's block table to cover every token it holds."""
        grow = len(seq) - self.bm.num_tokens(seq.handle)
        if grow > 0:
            self.bm.append_slots(seq.handle, grow)

    def truncate(self, seq: Sequence, n: int) -> None:
        """Roll the sequence back to its first n tokens: its block table too (blocks past
        the new end go back to the pool)."""
        if seq.handle is not None:
            self.bm.truncate(seq.handle, min(n, self.bm.num_tokens(seq.handle)))
        seq.truncate(n)

    # ---- deferred LLM calls -------------------------------------------------------------
    def wait_for_llm(self, seq: Sequence, step: int, parked: bool, score: Optional[float] = None) -> None:
        """The row needs the LLM from this step on: to make its next token (parked: it does
        not advance until then), or to check its tentative tokens (it goes on drafting)."""
        if seq.llm_since is None:
            seq.llm_since = step
            self.llm_queue.append(seq)
        if parked:
            seq.parked, seq.routed_score = True, score

    def llm_batch(self, step: int) -> List[Sequence]:
        """The rows the LLM runs for in this step, in the order they came: all that wait,
        once one has waited its max_llm_wait steps, llm_batch_min rows wait, or no running
        row can advance without the LLM; else none (they wait)."""
        q = self.llm_queue
        if not q:
            return []
        if (len(q) >= self.config.llm_batch_min or any(step - s.llm_since >= s.max_llm_wait for s in q)
                or all(s.parked for s in self.running)):
            self.llm_queue = []
            return q
        return []

    def llm_done(self, seqs: List[Sequence]) -> None:
        for s in seqs:
            s.llm_since, s.parked, s.routed_score = None, False, None

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.llm_since is not None and seq in self.llm_queue:  # a parked row holds its blocks until now
            self.llm_queue.remove(seq)
        self.llm_done([seq])
        seq.finish_reason = reason
        if seq.handle is not None:
            self.bm.free_sequence(seq.handle)
            seq.handle = None
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.by_id.pop(seq.request_id, None)

    def get(self, request_id: str):
        """The live (waiting or running) sequence of this id, or None."""
        return self.by_id.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)


def live_samples(seq: Sequence) -> List[Sequence]:
    """The samples of seq's prompt (SamplingParams.n) not yet finished, in order; [seq] alone
    when it has no siblings. A sample aborted while its group waited is gone from the queue."""
    return [s for s in seq.group if s.finish_reason is None] if seq.group is not None else [seq]
