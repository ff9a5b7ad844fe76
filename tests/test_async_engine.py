"""AsyncEngine directly (no HTTP): same outputs as Engine.generate, cancellation frees
blocks within a step, bad input raises, errors in a step fail only that step's requests,
the loop idles without spinning; and the load test with asyncio task cancellation."""
import asyncio
import random
import time

import pytest

from citer import Engine, SamplingParams
from citer.async_engine import AsyncEngine, RequestError
from citer.research.tasks import get_task

PROBLEMS = get_task("arith").test_problems(40)


@pytest.fixture(scope="module")
def engines():
    a = AsyncEngine(max_model_len=256, num_blocks=512)
    yield a, Engine(max_model_len=256, num_blocks=512)
    a.shutdown()


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def tokens(engine, prompt, params):
    ids = []
    async for delta in engine.generate(prompt, params):
        ids += delta.token_ids
    return ids


def free(a):
    bm = a.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks


def test_same_outputs_as_generate_and_seeded(engines):
    a, ref = engines
    p = SamplingParams(max_tokens=32, temperature=0.7, seed=3, policy="speculative")
    assert run(tokens(a, PROBLEMS[0].prompt, p)) == ref.generate([PROBLEMS[0].prompt], p)[0].token_ids


def test_bad_input_raises_and_idle_loop_sleeps(engines):
    a, _ = engines
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        run(tokens(a, [], SamplingParams()))
    t0 = time.process_time()  # CPU time of every thread of this process
    time.sleep(0.5)  # nothing running: the engine thread sleeps on its condition, it does not spin
    assert time.process_time() - t0 < 0.1
    run(a.check_health())


def test_step_errors_fail_that_steps_requests_only(engines, monkeypatch):
    a, ref = engines
    calls = {"n": 0}
    forward = a.engine.core.slm.forward

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return forward(*args, **kw)

    monkeypatch.setattr(a.engine.core.slm, "forward", flaky)

    async def main():
        return await asyncio.gather(tokens(a, PROBLEMS[1].prompt, SamplingParams(max_tokens=8, policy="slm")),
                                    return_exceptions=True)

    (err,) = run(main())
    assert isinstance(err, RequestError) and "simulated device fault" in str(err)
    monkeypatch.undo()
    p = SamplingParams(max_tokens=8, policy="slm")
    assert run(tokens(a, PROBLEMS[2].prompt, p)) == ref.generate([PROBLEMS[2].prompt], p)[0].token_ids
    assert free(a)


def test_load_with_task_cancellation(engines):
    a, ref = engines
    rng = random.Random(1)
    policies = [dict(policy="router"), dict(policy="llm"), dict(policy="speculative"), dict(policy="slm"),
                dict(policy="random", llm_fraction=0.2, seed=5), dict(policy="confidence", verify=True)]
    jobs = [(PROBLEMS[i].prompt, SamplingParams(max_tokens=rng.randint(4, 40), **rng.choice(policies)))
            for i in range(32)]

    async def main():
        tasks = [asyncio.ensure_future(tokens(a, *j)) for j in jobs]
        await asyncio.sleep(0.05)
        for t in tasks[::3]:
            t.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(main())
    for (prompt, params), res, i in zip(jobs, results, range(32)):
        if i % 3:
            assert res == ref.generate([prompt], params)[0].token_ids
    deadline = time.time() + 10
    while not (free(a) and not a.engine.has_unfinished_requests()) and time.time() < deadline:
        time.sleep(0.05)
    assert free(a) and a.stats["running"] == 0


def test_abort_is_a_no_op_on_unknown_ids(engines):
    a, _ = engines
    a.abort("never-was")
    run(a.check_health())


@pytest.mark.parametrize("n", [1, 3])
def test_abort_ends_the_stream(engines, n):
    """abort(id) ends the request's stream: a final "abort" delta for each sample still live
    (the stream once waited forever, its blocks freed but no final delta sent)."""
    a, _ = engines
    params = SamplingParams(max_tokens=200, ignore_eos=True, n=n, temperature=1.0, seed=1)

    async def consume():
        deltas = []
        async for d in a.generate(PROBLEMS[5].prompt, params, request_id="to-abort"):
            deltas.append(d)
            if len(deltas) == 2:
                a.abort("to-abort")
        return deltas

    deltas = run(consume(), timeout=30)
    ends = sorted((d.index, d.finish_reason) for d in deltas if d.finish_reason is not None)
    assert ends == [(i, "abort") for i in range(n)] and all(d.output is not None for d in deltas if d.finish_reason)
    assert settled(a)


def test_ids_that_look_like_samples(engines):
    """An n=1 request whose own id ends in "#<digits>" is sample 0 of itself."""
    a, _ = engines

    async def consume():
        return [d async for d in a.generate(PROBLEMS[6].prompt, SamplingParams(max_tokens=4), request_id="job#7")]

    deltas = run(consume())
    assert {d.index for d in deltas} == {0} and {d.request_id for d in deltas} == {"job#7"}


def test_add_requests_is_one_unit(engines):
    """Several prompts go in together or not at all; a consumer cancelled while they go in
    has them all aborted; token ids (tokenized elsewhere) are taken as they are."""
    a, ref = engines
    ids = ref.tokenizer(PROBLEMS[3].prompt).input_ids
    with pytest.raises(ValueError, match="prompt 2 has token ids outside"):
        run(a.add_requests([PROBLEMS[3].prompt, ids, [10 ** 9]], SamplingParams(max_tokens=8)))
    assert not a.engine.has_unfinished_requests() and free(a)

    async def both():
        streams = await a.add_requests([PROBLEMS[3].prompt, ids], SamplingParams(max_tokens=8, policy="slm"))
        return [[t for d in [x async for x in s] for t in d.token_ids] for s in streams]

    first, second = run(both())
    assert first == second == ref.generate([ids], SamplingParams(max_tokens=8, policy="slm"))[0].token_ids

    async def cancelled():
        task = asyncio.ensure_future(a.add_requests([ids] * 50, SamplingParams(max_tokens=200, ignore_eos=True)))
        await asyncio.sleep(0)  # queued on the engine thread, not yet settled
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.2)  # the engine thread settles the add on this (live) loop: it aborts them

    run(cancelled())
    assert settled(a)
    run(cancelled_on_a_closed_loop(a, ids))  # and when the consumer's loop is closed before the add settles
    assert settled(a)
    run(a.check_health())  # the engine thread serves on


def settled(a, within=5.0) -> bool:
    deadline = time.time() + within
    while not (free(a) and not a.engine.has_unfinished_requests()) and time.time() < deadline:
        time.sleep(0.01)
    return free(a) and a.stats["running"] == 0


async def cancelled_on_a_closed_loop(a, ids):
    task = asyncio.ensure_future(a.add_requests([ids] * 50, SamplingParams(max_tokens=200, ignore_eos=True)))
    await asyncio.sleep(0)
    task.cancel()  # asyncio.run then closes this loop at once
