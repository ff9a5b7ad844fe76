"""Cheap per-phase wall-clock timers, off unless the engine is built with profile=True.

Profiling times the path it profiles: graphs and the fused head stay on. Phases nest (the
unfused head times its router inside the SLM's phase) and each phase counts only its own
time, so the phases of a step add up to the step. On CUDA each phase boundary
synchronises the device, so GPU work lands in its phase. The fused Triton head computes
the router inside its one pass over the lm_head: there router_time is 0 and the router's
cost is part of slm_time.
"""
import time
from contextlib import contextmanager
from typing import Dict, List


class PhaseTimer:
    PHASES = ("slm", "router", "llm", "other")

    def __init__(self, enabled: bool, sync=None):
        self.enabled = enabled
        self.sync = sync  # e.g. torch.cuda.synchronize, so GPU work lands in its phase
        self.last: Dict[str, float] = {}
        self._inner: List[float] = []  # per open phase: time spent in phases nested in it

    def reset(self) -> None:
        self.last = {p: 0.0 for p in self.PHASES}

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            self.sync()
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            took = time.perf_counter() - t0
            inner = self._inner.pop()
            self.last[name] = self.last.get(name, 0.0) + took - inner
            if self._inner:
                self._inner[-1] += took


def attribute_time(phases: Dict[str, float], running, slm_seqs, llm_seqs, total: float) -> None:
    """Share one step's phase times among the sequences that took part in each phase
    (the rest of the step among all): stats slm_time, router_time, llm_time, other_time."""
    share = {"slm": slm_seqs, "router": slm_seqs, "llm": llm_seqs}
    for phase, seqs in share.items():
        for s in seqs:
            setattr(s.stats, f"{phase}_time", getattr(s.stats, f"{phase}_time") + phases.get(phase, 0.0) / len(seqs))
    other = max(total - sum(phases.values()), 0.0)
    for s in running:
        s.stats.other_time += other / len(running)
