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
