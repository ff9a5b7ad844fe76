"""generate, stream and the step API mixed on one engine: a seeded random walk over
add_request / step / abort / generate / partly consumed streams / external aborts of
streams / bad inputs / callers mutating their params, on a small KV pool, checking after
every operation that

- the blocks in use are exactly what the running requests hold (and the page manager's
  own invariants hold);
- every token event reaches its consumer exactly once, and only its consumer;
- every added request gets exactly one final output unless it was aborted;
- every output equals the same request run alone (greedy and seeded sampling), and an
  aborted request's tokens are a prefix of that.

Each operation runs under an alarm, so a hang (a stream that never ends) fails the test
instead of stalling the suite."""
import random
import signal
from contextlib import contextmanager
from dataclasses import replace

import pytest

from citer import Engine, SamplingParams
from conftest import random_prompts

KW = dict(block_size=8, num_blocks=14, max_model_len=48, max_num_seqs=3)
POLICIES = [dict(policy="slm"), dict(policy="llm"), dict(policy="router", threshold=0.5),
            dict(policy="random", llm_fraction=0.4), dict(policy="confidence", confidence_threshold=0.5),
            dict(policy="random", llm_fraction=0.3, temperature=0.9), dict(policy="slm", temperature=0.8, top_k=5)]


@contextmanager
def time_limit(seconds: int, what: str):
    def fail(*_):
        raise TimeoutError(f"{what} did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Walk:
    """The engine under test, the requests' expected outputs, and what each consumer got."""

    def __init__(self, engine, alone, rng):
        self.e, self.alone, self.rng = engine, alone, rng
        self.templates = []
        for i, prompt in enumerate(random_prompts(12, 2, 12, seed=31)):
            extra = POLICIES[i % len(POLICIES)]
            self.templates.append((prompt, SamplingParams(max_tokens=rng.randint(1, 14), seed=100 + i,
                                                          ignore_eos=True, **extra)))
        self.expected = {}  # template index -> token ids when run alone
        self.step_reqs = {}  # request id -> template index (step API)
        self.tokens = {}  # request id -> tokens its consumer has seen
        self.finals = {}  # request id -> number of final outputs seen
        self.aborted = set()
        self.streams = []  # (generator, template index, [request id or None])
        self.ops = []

    def ref(self, t):
        if t not in self.expected:
            prompt, params = self.templates[t]
            self.expected[t] = self.alone.generate([prompt], params)[0].token_ids
        return self.expected[t]

    # ---- operations --------------------------------------------------------------------
    def add(self):
        t = self.rng.randrange(len(self.templates))
        prompt, params = self.templates[t]
        mine = replace(params)
        rid = self.e.add_request(prompt, mine)
        mine.max_tokens = 500  # the caller changes its object afterwards: the request must not see it
        assert rid not in self.step_reqs and rid not in self.tokens
        self.step_reqs[rid] = t
        self.tokens[rid] = []

    def step(self):
        for ev in self.e.step():
            assert ev.request_id in self.step_reqs, f"step() returned another consumer's event {ev.request_id}"
            self.take(ev.request_id, ev, self.step_reqs[ev.request_id])

    def take(self, rid, ev, t):
        assert rid not in self.aborted and self.finals.get(rid, 0) == 0, f"event after the end of {rid}"
        if ev.token_id is not None:
            self.tokens[rid].append(ev.token_id)
        if ev.finish_reason is not None:
            self.finals[rid] = self.finals.get(rid, 0) + 1
            if ev.finish_reason == "abort":
                self.aborted.add(rid)
                assert self.tokens[rid] == self.ref(t)[:len(self.tokens[rid])]
            else:
                assert ev.finish_reason == "length", ev
                assert ev.output.token_ids == self.tokens[rid] == self.ref(t), rid

    def abort(self):
        live = [r for r in self.step_reqs if self.finals.get(r, 0) == 0 and r not in self.aborted]
        if not live:
            return
        rid = self.rng.choice(live)
        out = self.e.abort(rid)
        if out is not None:  # None: it finished in a step whose events this consumer has not taken yet
            self.aborted.add(rid)
            assert out.finish_reason == "abort" and out.token_ids[:len(self.tokens[rid])] == self.tokens[rid]
            assert out.token_ids == self.ref(self.step_reqs[rid])[:len(out.token_ids)]

    def generate(self):
        ts = [self.rng.randrange(len(self.templates)) for _ in range(self.rng.randint(1, 2))]
        outs = self.e.generate([self.templates[t][0] for t in ts], [self.templates[t][1] for t in ts])
        assert [o.token_ids for o in outs] == [self.ref(t) for t in ts]

    def open_stream(self):
        t = self.rng.randrange(len(self.templates))
        self.streams.append((self.e.stream(*self.templates[t]), t, [None]))
        for _ in range(self.rng.randint(0, 2)):
            self.advance(len(self.streams) - 1)

    def advance(self, i=None):
        if not self.streams:
            return
        i = self.rng.randrange(len(self.streams)) if i is None else i
        it, t, box = self.streams[i]
        ev = next(it, None)
        if ev is None:  # the stream ended
            assert box[0] is not None and self.finals.get(box[0], 0) == 1
            self.streams.pop(i)
            return
        if box[0] is None:
            box[0] = ev.request_id
            assert ev.request_id not in self.tokens
            self.tokens[ev.request_id] = []
        assert ev.request_id == box[0], "a stream yielded another request's event"
        self.take(box[0], ev, t)
        if ev.finish_reason is not None:
            self.streams.pop(i)

    def abort_stream(self):
        """Another consumer aborts a stream's request: the stream must end, not spin."""
        started = [s for s in self.streams if s[2][0] is not None]
        if started:
            self.e.abort(self.rng.choice(started)[2][0])

    def close_stream(self):
        if self.streams:
            it, _, box = self.streams.pop(self.rng.randrange(len(self.streams)))
            it.close()
            if box[0] is not None:
                self.aborted.add(box[0])

    def bad_input(self):
        cases = [([], SamplingParams()), ([5, 10_000], SamplingParams()), ("text", "not params"),
                 ([5, -1], SamplingParams()), ([5] * 48, SamplingParams())]
        prompt, params = self.rng.choice(cases)
        with pytest.raises((ValueError, TypeError)):
            self.e.add_request(prompt, params)

    OPS = ("add", "add", "step", "step", "step", "abort", "generate", "open_stream", "advance", "advance",
           "abort_stream", "close_stream", "bad_input")

    # ---- invariants ----------------------------------------------------------------------
    def check(self):
        bm = self.e.block_manager
        bm.check_invariants()
        running = self.e.core.scheduler.running
        held = sum(len(bm.block_table(s.handle)) for s in running)
        assert bm.num_blocks - bm.num_free_blocks == held
        assert all(n == 1 for n in self.finals.values())

    def drain(self):
        for _ in range(500):
            if self.streams:
                self.advance(0)
            elif self.e.has_unfinished_requests():
                self.step()
            else:
                break
        self.step()  # what is left for the step API after the last step
        for rid in self.tokens:
            assert rid in self.aborted or self.finals.get(rid) == 1, f"{rid} got no final output"
        bm = self.e.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not self.e.has_unfinished_requests()


@pytest.fixture(scope="module")
def pair(hf_models, router_path):
    return hf_models["qwen2"][0], hf_models["llama"][0], router_path


@pytest.fixture(scope="module")
def alone(pair):
    return Engine(*pair, **KW)


@pytest.mark.parametrize("seed", range(6))
def test_random_mix_of_the_three_apis(pair, alone, seed):
    engine = Engine(*pair, **KW)
    rng = random.Random(seed)
    walk = Walk(engine, alone, rng)
    for n in range(60):
        op = rng.choice(Walk.OPS)
        walk.ops.append(op)
        with time_limit(20, f"op {n} ({op})"):
            try:
                getattr(walk, op)()
                walk.check()
            except BaseException as e:
                raise AssertionError(f"op {n} ({op}) after {walk.ops[:-1]}: {e!r}") from e
    with time_limit(60, "draining"):
        walk.drain()
