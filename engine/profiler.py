"""Cheap per-phase wall-clock timers, off unless the engine is built with profile=True."""
import time
from contextlib import contextmanager
from typing import Dict


class PhaseTimer:
    PHASES = ("slm", "router", "llm", "other")

    def __init__(self, enabled: bool, sync=None):
        self.enabled = enabled
        self.sync = sync  # e.g. torch.cuda.synchronize, so GPU work lands in its phase
        self.last: Dict[str, float] = {}

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
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.last[name] = self.last.get(name, 0.0) + time.perf_counter() - t0


def attribute_time(phases: Dict[str, float], running, slm_seqs, llm_seqs, total: float) -> None:
    """Share one step's phase times among the sequences that took part in each phase
    (the rest of the step among all): stats slm_time, router_time, llm_time, other_time."""
    share = {"slm": slm_seqs, "router": slm_seqs, "llm": llm_seqs}
    for phase, seqs in share.items():
        for s in seqs:
            s.stats[f"{phase}_time"] = s.stats.get(f"{phase}_time", 0.0) + phases.get(phase, 0.0) / len(seqs)
    other = max(total - sum(phases.values()), 0.0)
    for s in running:
        s.stats["other_time"] = s.stats.get("other_time", 0.0) + other / len(running)
