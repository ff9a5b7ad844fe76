"""How many CPU threads a step's ops use, chosen by measurement while the engine runs.

A decode step on the CPU is hundreds of small parallel regions (one per op). Each region
ends at a barrier that waits for every thread of the pool; when another process holds one
of the cores, the thread on that core waits for its time slice at every barrier, and the
step slows by an order of magnitude (measured on 2 cores beside one busy process: a
100M-parameter decode step from 54 ms with one thread to 514 ms with two). One thread
never waits at a barrier. So on the CPU the engine keeps timing its decode steps and, every
`every` steps, tries the other thread count for `trial` steps, keeping whichever made a
decode row cheaper; a quiet machine settles on all cores, a shared one on one, and the
choice follows the neighbour as it comes and goes. EngineArgs.cpu_threads fixes the count
instead (no probing).
"""
import statistics
import time
from typing import Dict, List, Optional

import torch


class ThreadTuner:
    def __init__(self, max_threads: int, every: int = 48, trial: int = 6):
        self.options = sorted({max_threads, 1}, reverse=True)
        self.every, self.trial = every, trial
        self.current = self.options[0]
        self.samples: Dict[int, List[float]] = {n: [] for n in self.options}
        self.steps = 0
        self.trying: Optional[int] = None  # the count under trial, and until which step
        self.until = 0
        self.t0 = 0.0
        torch.set_num_threads(self.current)

    def before_step(self) -> None:
        self.steps += 1
        probe = self.steps == self.trial + 2 or self.steps % self.every == 0  # soon after the start, then now and then
        if len(self.options) > 1 and self.trying is None and probe:
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
                self.current = self.trying
            self.trying = None
            torch.set_num_threads(self.current)
