"""The failures the random walk of test_concurrent_use.py is built around, one test each
(each fails on the engine before the concurrent-use fixes): generate and other
consumers, streams whose request ends elsewhere, ids, params ownership, faults late in a
step and whole-step failures, tiny temperatures, router scores, dropping the router."""
import pytest

from citer import Engine, SamplingParams
from conftest import random_prompts
from test_concurrent_use import KW, alone, pair, time_limit  # noqa: F401  (fixtures)


def solo(alone, prompt, params):
    return alone.generate([prompt], params)[0].token_ids


def test_generate_leaves_other_consumers_requests_alone(pair, alone):
    """generate() collects only its own outputs; a step-API request that progressed (or
    finished) meanwhile gets every event at the next step(), and a stream opened before
    continues where it was."""
    e = Engine(*pair, **KW)
    p3 = SamplingParams(max_tokens=3, ignore_eos=True, policy="slm")
    p20 = SamplingParams(max_tokens=20, ignore_eos=True, policy="random", llm_fraction=0.3, seed=4)
    rid = e.add_request([5, 6, 7], p3)
    s = e.stream([8, 9, 10], p20)
    first = next(s)
    out = e.generate([[9, 9, 9]], SamplingParams(max_tokens=10, ignore_eos=True, policy="slm"))[0]
    assert out.token_ids == solo(alone, [9, 9, 9], SamplingParams(max_tokens=10, ignore_eos=True, policy="slm"))
    events = e.step()
    assert [ev.request_id for ev in events] == [rid] * 3  # made during generate, none lost
    assert [ev.token_id for ev in events] == events[-1].output.token_ids == solo(alone, [5, 6, 7], p3)
    rest = [first] + list(s)
    assert [ev.token_id for ev in rest] == solo(alone, [8, 9, 10], p20)
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_stream_ends_when_its_request_ends_elsewhere(pair, alone):
    e = Engine(*pair, **KW)
    p = SamplingParams(max_tokens=30, ignore_eos=True, policy="slm")
    s = e.stream([5, 6, 7], p)
    ev = next(s)
    with time_limit(20, "a stream after its request was aborted"):
        assert e.abort(ev.request_id).finish_reason == "abort"
        last = next(s)
        assert last.finish_reason == "abort" and last.token_id is None and last.output.token_ids == [ev.token_id]
        assert next(s, None) is None
    # step() while streams are open, and two streams interleaved: each gets its own tokens
    a, b = e.stream([5, 6, 7], p), e.stream([8, 9], p)
    got = {0: [next(a).token_id], 1: [next(b).token_id]}
    assert e.step() == []  # the streams' events are theirs, not the step API's
    for ev_a, ev_b in zip(a, b):
        got[0].append(ev_a.token_id)
        got[1].append(ev_b.token_id)
    assert got == {0: solo(alone, [5, 6, 7], p), 1: solo(alone, [8, 9], p)}


def test_auto_ids_never_collide_with_user_ids(pair):
    e = Engine(*pair, **KW)
    p = SamplingParams(max_tokens=4, ignore_eos=True, policy="slm")
    e.add_request([5, 6, 7], p, request_id="req-1")
    e.add_request([5, 6, 7], p, request_id="req-2")
    outs = e.generate([[5, 6], [7, 8]], p)
    assert {o.request_id for o in outs}.isdisjoint({"req-1", "req-2"}) and len({o.request_id for o in outs}) == 2
    done = [ev.request_id for _ in range(10) for ev in e.step() if ev.output is not None]
    assert sorted(done) == ["req-1", "req-2"]
    with pytest.raises(ValueError, match="request_id must be a non-empty string"):
        e.add_request([5], p, request_id=7)


def test_requests_own_their_params(pair, alone):
    """Changing a SamplingParams object after add_request changes nothing, for a running
    request and for one still waiting for blocks."""
    e = Engine(*pair, block_size=8, num_blocks=4, max_model_len=48, max_num_seqs=3)
    p = SamplingParams(max_tokens=20, ignore_eos=True, policy="slm")
    a = e.add_request([5, 6, 7], p)
    b = e.add_request([8, 9, 10], p)  # waits: the pool holds one such request at a time
    p.max_tokens = 200
    p.policy = "llm"
    outs = {}
    with time_limit(60, "requests whose params were changed"):
        while e.has_unfinished_requests():
            outs.update({ev.request_id: ev.output for ev in e.step() if ev.output is not None})
    ref = SamplingParams(max_tokens=20, ignore_eos=True, policy="slm")
    assert outs[a].token_ids == solo(alone, [5, 6, 7], ref) and outs[b].token_ids == solo(alone, [8, 9, 10], ref)


def test_a_fault_late_in_a_step_keeps_the_other_outputs(pair, monkeypatch):
    e = Engine(*pair, **KW)
    p = SamplingParams(max_tokens=1, ignore_eos=True, policy="slm")
    ids = [e.add_request([5 + i, 6, 7], p) for i in range(3)]
    update = e.core.detok.update

    def flaky(seq, upto, finishing, **kw):
        if seq.request_id == ids[2]:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return update(seq, upto, finishing, **kw)

    monkeypatch.setattr(e.core.detok, "update", flaky)
    events = {ev.request_id: ev for ev in e.step()}
    assert [events[r].finish_reason for r in ids] == ["length", "length", "error"]
    assert len(events[ids[0]].output.token_ids) == 1 and "simulated" in events[ids[2]].output.error
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_a_failed_step_ends_every_consumers_requests(pair, monkeypatch):
    """A forward that raises fails the step as a whole: the consumer driving it gets the
    error, a step-API request in it gets an "error" final event, a stream in it raises."""
    e = Engine(*pair, **KW)
    p = SamplingParams(max_tokens=8, ignore_eos=True, policy="slm")
    rid = e.add_request([5, 6, 7], p)
    s = e.stream([8, 9], p)
    next(s)
    monkeypatch.setattr(e.core.slm, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        e.generate([[3, 4]], p)
    monkeypatch.undo()
    errors = [ev for ev in e.step() if ev.request_id == rid]
    assert errors[-1].finish_reason == "error" and "device lost" in errors[-1].output.error
    with pytest.raises(RuntimeError, match="failed: RuntimeError: device lost"):
        list(s)
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    assert e.generate([[3, 4]], p)[0].finish_reason == "length"  # and the engine serves on


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tiny_temperatures_are_greedy(pair, backend):
    e = Engine(*pair[:2], block_size=16, num_blocks=8, max_model_len=32, backend=backend)
    prompts = random_prompts(2, 3, 6, seed=5)
    greedy = e.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True, policy="slm"))
    for t in (1e-40, 1e-7):
        outs = e.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True, policy="slm", temperature=t,
                                                  seed=1))
        assert [o.token_ids for o in outs] == [g.token_ids for g in greedy]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_router_scores_follow_the_policy_not_the_batch(pair, backend):
    e = Engine(*pair, block_size=16, num_blocks=8, max_model_len=32, backend=backend)
    slm = SamplingParams(max_tokens=3, ignore_eos=True, policy="slm")
    routed = SamplingParams(max_tokens=3, ignore_eos=True, policy="router", threshold=0.5)
    alone_out = e.generate([[5, 6, 7]], slm)[0]
    mixed = e.generate([[5, 6, 7], [8, 9]], [slm, routed])
    assert alone_out.router_scores == mixed[0].router_scores == [None] * 3
    assert all(isinstance(s, float) and 0 < s < 1 for s in mixed[1].router_scores)
    assert e.generate([[5, 6, 7]], SamplingParams(max_tokens=2, policy="confidence", ignore_eos=True))[0] \
        .router_scores == [None, None]


def test_the_router_cannot_be_dropped_under_its_requests(pair):
    e = Engine(*pair, **KW)
    rid = e.add_request([5, 6], SamplingParams(max_tokens=5, policy="router", threshold=0.5))
    with pytest.raises(ValueError, match="cannot drop the router while 1 request"):
        e.set_router(None)
    e.abort(rid)
    e.set_router(None)
    assert e.router is None
