"""The CPU thread tuner: it keeps the thread count whose decode steps are cheaper, probing
the other one now and then, and EngineArgs.cpu_threads fixes the count instead."""
import time

import torch

from citer import Engine, SamplingParams
from citer.engine.threads import ThreadTuner


def test_the_tuner_keeps_the_faster_count(monkeypatch):
    before = torch.get_num_threads()
    try:
        t = ThreadTuner(2, every=10, trial=3)
        assert t.current == 2 and torch.get_num_threads() == 2
        cost = {2: 0.010, 1: 0.002}  # one thread is faster here (a busy neighbour)
        clock = [0.0]
        monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
        for _ in range(44):
            t.before_step()
            clock[0] += cost[torch.get_num_threads()]
            t.after_step(1, True)
        assert t.current == 1 and torch.get_num_threads() == 1
        cost = {2: 0.001, 1: 0.002}  # the neighbour left: two threads win again at the next probe
        for _ in range(44):
            t.before_step()
            clock[0] += cost[torch.get_num_threads()]
            t.after_step(1, True)
        assert t.current == 2
        t.after_step(0, False)  # prefill steps are not measured
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_fixes_the_count(hf_models):
    before = torch.get_num_threads()
    try:
        e = Engine(llm=hf_models["llama"][0], cpu_threads=1, block_size=8, num_blocks=32, max_model_len=64)
        assert e.core.tuner is None and torch.get_num_threads() == 1
        assert len(e.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4
        assert Engine(llm=hf_models["llama"][0], block_size=8, num_blocks=32, max_model_len=64).core.tuner is not None
    finally:
        torch.set_num_threads(before)


def test_probes_back_off_on_a_quiet_machine_and_a_slowdown_probes_at_once(monkeypatch):
    """Losing probes double the interval (a quiet machine stops paying for them); a neighbour
    arriving (the count in use slows down 5x) is answered within a trial, not an interval."""
    before = torch.get_num_threads()
    try:
        t = ThreadTuner(2, every=10, trial=3)
        cost = {2: 0.001, 1: 0.0018}
        clock = [0.0]
        monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
        one_thread_steps = 0
        for _ in range(2000):
            t.before_step()
            one_thread_steps += torch.get_num_threads() == 1
            clock[0] += cost[torch.get_num_threads()]
            t.after_step(1, True)
        assert t.current == 2 and t.interval == ThreadTuner.MAX_BACKOFF * 10
        assert one_thread_steps <= 3 * 14  # 20, 40, ... then 320 apart: 13-14 probes in 2000 steps, not 200
        cost = {2: 0.005, 1: 0.0018}  # a neighbour arrives: two threads now wait at every barrier
        for step in range(12):
            t.before_step()
            clock[0] += cost[torch.get_num_threads()]
            t.after_step(1, True)
        assert t.current == 1 and t.interval == 10
    finally:
        torch.set_num_threads(before)
