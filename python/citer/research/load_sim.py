"""A load simulator: recorded routing decisions played through the engine's own core.

The engine's EngineCore, scheduler, policies and deferral logic run unchanged; only the two
model runners are replaced by SimRunner, which advances a simulated clock by the cost
model's time for each forward (cost_model.step_time) instead of computing it. Each request
replays a recorded trace (benchmarks/replay.py records them from real runs): at its i-th
SLM step the LLM is called iff the trace says so, and at each verification the recorded
number of tentative tokens stands. So the steps, batches, LLM calls, parked waits and
rollbacks are exactly the engine's, at any concurrency and arrival process, and only the
time per forward is modelled.

Arrivals: closed loop (`concurrency` requests in flight; a new one starts when one ends)
or Poisson (`rate` requests/s). Reported: throughput (generated tokens per second), time to
first token (TTFT) and time per output token (TPOT: a request's time from its first to its
last token over its other tokens; speculative and check-and-correct emit tokens in bursts,
so gaps between single tokens would say little), p50 / p99 over requests.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence as Seq

import numpy as np

from citer.engine.config import EngineConfig
from citer.engine.core import EngineCore
from citer.engine.head import StepResult
from citer.engine.policies import LLMOnly, Policy, Speculative
from citer.engine.profiler import PhaseTimer
from citer.engine.sampling_params import SamplingParams
from citer.engine.sequence import Sequence

from .cost_model import Device, Shape, Step, step_time
from .replay import Trace

SIM_TOKEN = 7  # every simulated token (no EOS: requests end at their trace's length)


@dataclass
class Clock:
    now: float = 0.0
    busy: Dict[str, float] = field(default_factory=lambda: {"slm": 0.0, "llm": 0.0})


class SimRunner:
    """A ModelRunner's interface (run) over the cost model: computes nothing, takes time."""

    def __init__(self, name: str, shape: Shape, device: Device, clock: Clock, graphs: bool = True, tp: int = 1):
        self.name, self.shape, self.device, self.clock, self.graphs, self.tp = name, shape, device, clock, graphs, tp

    def run(self, seqs, spec, head_tokens=None, route=None, ends=None) -> StepResult:
        if head_tokens is not None and all(n == 1 for n in head_tokens):
            head_tokens = None
        starts, ends = [s.num_computed[self.name] for s in seqs], ends or [len(s) for s in seqs]
        step = Step(tuple((e - s, e) for s, e in zip(starts, ends)), sum(head_tokens) if head_tokens else len(seqs))
        # CUDA graphs serve decode steps and short catch-ups; prefills and long catch-ups run eagerly
        graphed = self.graphs and max(e - s for s, e in zip(starts, ends)) <= 32
        took = step_time(self.shape, step, self.device, graphs=graphed, tp=self.tp)
        self.clock.now += took
        self.clock.busy[self.name] += took
        n = len(seqs)
        out = StepResult([SIM_TOKEN] * n, [1.0] * n, None, spans=list(zip(starts, ends)))
        if head_tokens is not None:
            out.position_tokens = [[SIM_TOKEN] * k for k in head_tokens]
        if route is not None:
            out.to_llm = route.decide(out.top_prob, None)
        return out


class TracePolicy(Policy):
    """A recorded request's decisions: the LLM at its i-th SLM step iff calls[i]."""

    name = "trace"

    def __init__(self, calls: Seq[bool]):
        super().__init__(False)
        self.calls, self.i = list(calls), 0

    def decide(self, seq, top_prob, score) -> bool:
        call = self.calls[self.i] if self.i < len(self.calls) else True
        self.i += 1
        return call


@dataclass
class SimResult:
    seconds: float
    tokens: int
    ttft: List[float]
    tpot: List[float]
    llm_steps: int
    slm_steps: int

    def summary(self) -> Dict[str, float]:
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
        return {"throughput": self.tokens / max(self.seconds, 1e-12), "ttft_p50": pct(self.ttft, 50),
                "ttft_p99": pct(self.ttft, 99), "tpot_p50": pct(self.tpot, 50), "tpot_p99": pct(self.tpot, 99),
                "llm_steps": self.llm_steps, "slm_steps": self.slm_steps, "seconds": self.seconds,
                "tokens": self.tokens}


def simulate(traces: List[Trace], slm: Shape, llm: Shape, device: Device, mode: str, num_requests: int,
             concurrency: Optional[int] = None, rate: Optional[float] = None, prompt_len: Optional[int] = None,
             max_llm_wait: int = 0, llm_batch_min: int = 1, llm_tp: int = 1, graphs: bool = True,
             seed: int = 0, max_model_len: int = 8192) -> SimResult:
    """mode: "llm" (LLM alone), "routed" (the traces' decisions, parked rows), "speculative"
    (the traces are a speculative run's: drafts and kept counts). Closed loop at
    `concurrency`, or Poisson arrivals at `rate` requests/s."""
    import citer.engine.core as core_mod

    clock = Clock()
    block_size = 16
    config = EngineConfig("cpu", block_size, num_blocks=1 << 20, max_model_len=max_model_len,
                          max_num_seqs=concurrency or 256, max_num_batched_tokens=1 << 30,
                          max_llm_wait=max_llm_wait, llm_batch_min=llm_batch_min)
    from citer._C import BlockManager

    bm = BlockManager(config.num_blocks, block_size)
    core = EngineCore(config, bm, SimRunner("slm", slm, device, clock, graphs),
                      SimRunner("llm", llm, device, clock, graphs, llm_tp), None, None, [], 1 << 20,
                      PhaseTimer(False))
    rng = np.random.default_rng(seed)
    kept_of: Dict[str, List[int]] = {}
    arrivals: List[float] = []
    if rate is not None:
        arrivals = list(np.cumsum(rng.exponential(1.0 / rate, num_requests)))
    started: Dict[str, float] = {}
    first: Dict[str, float] = {}
    last: Dict[str, float] = {}
    ttft, tpot, tokens = [], [], 0
    count_of: Dict[str, int] = {}
    llm_steps = slm_steps = 0
    next_id = 0

    def add(now: float) -> None:
        nonlocal next_id
        t = traces[next_id % len(traces)]
        rid = f"r{next_id}"
        plen = prompt_len or t.prompt_len
        params = SamplingParams(max_tokens=t.new_tokens, ignore_eos=True)
        policy: Policy = {"llm": LLMOnly, "routed": TracePolicy, "speculative": _SpecTrace}[mode](
            *(() if mode == "llm" else (t.calls,)))
        seq = Sequence(rid, [SIM_TOKEN] * plen, params, policy, next_id, max_model_len, max_llm_wait)
        kept_of[rid] = list(t.kept)
        core.add([seq], "sim")
        started[rid] = now
        next_id += 1

    def replay_verify(seq, tokens, probs):
        kept = kept_of[seq.request_id].pop(0) if kept_of[seq.request_id] else seq.num_tentative
        kept = min(kept, seq.num_tentative)
        return kept, tokens[kept]

    verify, core_mod.verify = core_mod.verify, replay_verify
    run_slm, run_llm = core.slm.run, core.llm.run

    def count(kind, fn):
        def wrapped(*a, **k):
            nonlocal llm_steps, slm_steps
            if kind == "llm":
                llm_steps += 1
            else:
                slm_steps += 1
            return fn(*a, **k)
        return wrapped

    core.slm.run, core.llm.run = count("slm", run_slm), count("llm", run_llm)
    try:
        if rate is None:
            for _ in range(min(concurrency, num_requests)):
                add(0.0)
        done = 0
        while done < num_requests:
            while rate is not None and next_id < num_requests and arrivals[next_id] <= clock.now:
                add(arrivals[next_id])
            if not core.has_unfinished():
                if rate is not None and next_id < num_requests:
                    clock.now = max(clock.now, arrivals[next_id])
                    continue
                break
            core.step()
            for ev in core.take("sim"):
                rid = ev.request_id
                if ev.token_id is not None:
                    tokens += 1
                    count_of[rid] = count_of.get(rid, 0) + 1
                    if rid not in first:
                        first[rid] = clock.now
                        ttft.append(clock.now - started[rid])
                    last[rid] = clock.now
                if ev.finish_reason is not None:
                    done += 1
                    if count_of.get(rid, 0) > 1:
                        tpot.append((last[rid] - first[rid]) / (count_of[rid] - 1))
                    if rate is None and next_id < num_requests:
                        add(clock.now)
    finally:
        core_mod.verify = verify
    return SimResult(clock.now, tokens, ttft, tpot, llm_steps, slm_steps)


class _SpecTrace(Speculative):
    """A recorded speculative run: the LLM verifies at the recorded SLM steps."""

    def __init__(self, calls: Seq[bool]):
        super().__init__(num_draft_tokens=1 << 30, draft_confidence=None)
        self.calls, self.i = list(calls), 0

    def decide(self, seq, top_prob, score) -> bool:
        call = self.calls[self.i] if self.i < len(self.calls) else True
        self.i += 1
        return call
