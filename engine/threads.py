"""How many CPU threads a step's ops use, chosen by measurement while the engine runs.

A decode step on the CPU is hundreds of small parallel regions (one per op). Each region
ends at a barrier that waits for every thread of the pool; when another process holds one
of the cores, the thread on that core waits for its time slice at every barrier, and the
step slows by an order of magnitude (measured on 2 cores beside one busy process: a
100M-parameter decode step from 54 ms with one thread to 514 ms with two). One thread
never waits at a barrier. So on the CPU the engine keeps timing its decode steps and tries
the other thread count for `trial` steps now and then, keeping whichever made a decode row
cheaper. Probes start `every` steps apart and back off (doubling, up to 32x) while they
keep losing, since each costs a quiet machine `trial` slower steps (12% of a 48-token
request's steps without the back-off); a switch resets the interval, and a sudden slowdown
of the count in use (its median row cost over twice the one at the last decision: a
neighbour arrived, or the batch shrank) starts a probe at once, so the choice still follows
the neighbour as it comes and goes. A quiet machine settles on all cores, a shared one on
one. EngineArgs.cpu_threads fixes the count instead (no probing).
"""
import statistics
import time
from typing import Dict, List, Optional

import torch


class ThreadTuner:
    MAX_BACKOFF = 32  # the longest probe interval, in multiples of `every`

    def __init__(self, max_threads: int, every: int = 48, trial: int = 6):
        self.options = sorted({max_threads, 1}, reverse=True)
        self.every, self.trial = every, trial
        self.current = self.options[0]
        self.samples: Dict[int, List[float]] = {n: [] for n in self.options}
        self.steps = 0
        self.interval = every
        self.next_probe = trial + 2  # soon after the start
        self.reference: Optional[float] = None  # the current count's median row cost at the last decision
        self.trying: Optional[int] = None  # the count under trial, and until which step
        self.until = 0
        self.t0 = 0.0
        torch.set_num_threads(self.current)

    def _slowed_down(self) -> bool:
        mine = self.samples[self.current]
        return (self.reference is not None and len(mine) >= self.trial
                and statistics.median(mine) > 2 * self.reference)

    def before_step(self) -> None:
        self.steps += 1
        if len(self.options) > 1 and self.trying is None and (self.steps >= self.next_probe or self._slowed_down()):
            self.trying = next(n for n in self.options if n != self.current)
            self.until = self.steps + self.trial
            self.samples[self.trying] = []
            torch.set_num_threads(self.trying)
        self.t0 = time.perf_counter()

    def after_step(self, rows: int, decode_only: bool) -> None:
        """rows: sequences this step advanced; decode_only: no prefill or long catch-up in it."""
        if not decode_only or rows == 0:
            return
        n = torch.get_num_threads()
        keep = self.samples.setdefault(n, [])
        keep.append((time.perf_counter() - self.t0) / rows)
        del keep[:-self.trial]
        if self.trying is not None and self.steps >= self.until:
            mine, theirs = self.samples[self.current], self.samples[self.trying]
            if theirs and mine and statistics.median(theirs) < 0.9 * statistics.median(mine):
                self.current, self.interval = self.trying, self.every
            else:
                self.interval = min(2 * self.interval, self.MAX_BACKOFF * self.every)
            self.trying = None
            self.next_probe = self.steps + self.interval
            kept = self.samples[self.current]
            self.reference = statistics.median(kept) if kept else None
            torch.set_num_threads(self.current)
